"""Smart-home voice commands with their intents: what the MiniLM workload is scored on.

Written for this project (no dataset download): twelve intents a home hub or speaker
must tell apart, ten phrasings each, deliberately varied in wording and length so that
nearest-centroid classification on sentence embeddings is a real test of the encoder,
and with near neighbours (lights on/off, music play/stop, thermostat up/down) that a
degraded encoder confuses first.

Each intent's phrasings are split by position, the same way every time: the first
``CENTROID_PHRASINGS`` build the class centroids, the next ``VAL_PHRASINGS`` are a
validation split and the rest are held out for the test split.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

CENTROID_PHRASINGS = 5
VAL_PHRASINGS = 1


@dataclass(frozen=True)
class Intent:
    name: str
    phrasings: tuple[str, ...]


INTENTS: tuple[Intent, ...] = (
    Intent(
        "lights_on",
        (
            "turn on the lights",
            "switch the living room lights on",
            "lights on please",
            "can you turn the kitchen light on",
            "it's too dark in here, put the lights on",
            "illuminate the hallway",
            "switch on the bedroom lamp",
            "I need some light in the study",
            "power up the ceiling lights",
            "could you light up the dining room",
        ),
    ),
    Intent(
        "lights_off",
        (
            "turn off the lights",
            "switch the living room lights off",
            "lights off please",
            "can you turn the kitchen light off",
            "kill the lights",
            "darken the hallway",
            "switch off the bedroom lamp",
            "no more light in the study, thanks",
            "shut off the ceiling lights",
            "could you turn out the lights in the dining room",
        ),
    ),
    Intent(
        "thermostat_up",
        (
            "turn up the heating",
            "make it warmer in here",
            "raise the temperature by two degrees",
            "set the thermostat higher",
            "I'm cold, increase the heat",
            "bump the thermostat up a notch",
            "warm up the living room",
            "increase the temperature to twenty two",
            "it's freezing, can you crank up the heat",
            "heat the house a bit more",
        ),
    ),
    Intent(
        "thermostat_down",
        (
            "turn down the heating",
            "make it cooler in here",
            "lower the temperature by two degrees",
            "set the thermostat lower",
            "I'm too hot, decrease the heat",
            "bring the thermostat down a notch",
            "cool down the bedroom",
            "reduce the temperature to eighteen",
            "it's boiling in here, turn the heat down",
            "less heating please",
        ),
    ),
    Intent(
        "lock_door",
        (
            "lock the front door",
            "make sure the back door is locked",
            "lock up the house",
            "secure the garage door",
            "is the door locked? lock it",
            "bolt the front door",
            "lock all the doors for the night",
            "please lock the patio door",
            "engage the door lock",
            "lock the entrance",
        ),
    ),
    Intent(
        "play_music",
        (
            "play some music",
            "put on my workout playlist",
            "play jazz in the kitchen",
            "start the music",
            "I want to hear some rock",
            "play the latest album by my favourite band",
            "resume my playlist",
            "play something relaxing",
            "can you play songs by the beatles",
            "shuffle my liked songs",
        ),
    ),
    Intent(
        "stop_music",
        (
            "stop the music",
            "pause the song",
            "turn the music off",
            "silence the speaker",
            "enough music for now",
            "stop playing",
            "pause playback in the kitchen",
            "end the playlist",
            "quiet please, stop the song",
            "kill the music",
        ),
    ),
    Intent(
        "weather",
        (
            "what's the weather like today",
            "will it rain tomorrow",
            "how hot will it be this afternoon",
            "do I need an umbrella",
            "what's the forecast for the weekend",
            "is it going to snow tonight",
            "tell me the weather",
            "how cold is it outside",
            "is it sunny out",
            "what's the temperature outside right now",
        ),
    ),
    Intent(
        "set_timer",
        (
            "set a timer for ten minutes",
            "start a five minute timer",
            "time my pasta for eight minutes",
            "countdown from thirty seconds",
            "remind me in twenty minutes",
            "set a kitchen timer for an hour",
            "alert me when fifteen minutes are up",
            "timer for three minutes please",
            "start counting down two minutes",
            "can you time forty five minutes",
        ),
    ),
    Intent(
        "vacuum",
        (
            "start the robot vacuum",
            "clean the floors",
            "vacuum the living room",
            "send the robot to clean the kitchen",
            "run the vacuum cleaner",
            "the carpet is dirty, start cleaning",
            "begin a cleaning cycle",
            "have the robot hoover the hallway",
            "vacuum upstairs",
            "start the cleaner in the bedroom",
        ),
    ),
    Intent(
        "open_blinds",
        (
            "open the blinds",
            "raise the shades in the bedroom",
            "let some sunlight in",
            "pull up the curtains",
            "open the living room shutters",
            "roll up the blinds",
            "open the curtains please",
            "lift the window shades",
            "draw back the curtains in the study",
            "open all the blinds downstairs",
        ),
    ),
    Intent(
        "doorbell_camera",
        (
            "who is at the door",
            "show me the front door camera",
            "show the doorbell video",
            "is someone outside the front door",
            "let me see the porch camera",
            "display the entrance camera on the tv",
            "who just rang the bell",
            "check the doorbell camera",
            "show me who is on the porch",
            "open the camera feed for the driveway",
        ),
    ),
)

INTENT_NAMES: tuple[str, ...] = tuple(intent.name for intent in INTENTS)


@dataclass(frozen=True)
class PhraseSplit:
    """Phrases and their intent indices (into ``INTENT_NAMES``)."""

    phrases: tuple[str, ...]
    labels: tuple[int, ...]


def split_phrasings() -> tuple[PhraseSplit, PhraseSplit, PhraseSplit]:
    """(centroid/train, val, test) splits, by position within each intent."""
    parts: list[tuple[list[str], list[int]]] = [([], []), ([], []), ([], [])]
    bounds = (0, CENTROID_PHRASINGS, CENTROID_PHRASINGS + VAL_PHRASINGS, None)
    for label, intent in enumerate(INTENTS):
        for part, (lo, hi) in zip(parts, itertools.pairwise(bounds), strict=True):
            chosen = intent.phrasings[lo:hi]
            part[0].extend(chosen)
            part[1].extend([label] * len(chosen))
    train, val, test = (PhraseSplit(tuple(p), tuple(labels)) for p, labels in parts)
    return train, val, test

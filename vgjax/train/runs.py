"""A vgjax training run as the source of a network: its best (or last) checkpoint with the
architecture it was trained with, for evaluation elsewhere or as the start of another training
(e.g. CRN's second stage from a NetVLAD run, reference §2.5)."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from vgjax.configs import common
from vgjax.models import geoloc_net, pretrained
from vgjax.train import checkpoint

ARCHITECTURE_KEYS = geoloc_net.ARCHITECTURE_KEYS  # the model keys that change the parameters


def architecture_differences(model_config: ml_collections.ConfigDict, saved_model: dict, *,
                             keep_defaults: bool) -> list[str]:
    """"model.key=value (the run's: value)" for each architecture key that differs from the
    saved run's; with keep_defaults, a key left at its default is not a difference."""
    defaults = common.get_config().model
    saved = saved_architecture(saved_model)
    return [f"model.{key}={model_config[key]!r} (the run's: {saved[key]!r})"
            for key in ARCHITECTURE_KEYS
            if _value(model_config[key]) != _value(saved[key])
            and not (keep_defaults and _value(model_config[key]) == _value(defaults[key]))]


def _value(value):
    """A config value as saved to JSON and read back (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def saved_architecture(saved_model: dict) -> dict:
    """The architecture keys of a saved run's model section; keys a run saved before they
    existed (the GSV-Cities aggregations' options) take their defaults."""
    defaults = common.get_config().model
    return {key: saved_model.get(key, defaults[key]) for key in ARCHITECTURE_KEYS}


def _crn_from_netvlad(model_config: ml_collections.ConfigDict, saved_model: dict) -> bool:
    return model_config.aggregation == "crn" and saved_model["aggregation"] == "netvlad"


def network_from_run(model_config: ml_collections.ConfigDict, run: Path, image_size: tuple[int, int], *,
                     keep_defaults: bool, seed: int = 0):
    """(model config with the run's architecture, network, variables) from the run's
    model_config.resume_checkpoint ("best" or "last").

    With keep_defaults (evaluation), architecture keys left at their defaults take the run's
    values; otherwise (training) they must all agree, except that a CRN network may start from
    a NetVLAD run: its NetVLAD layer and backbone come from the run, its context module is new.
    Any other difference is a ValueError naming the keys.
    """
    saved, variables, step = checkpoint.read_run(run, model_config.resume_checkpoint)
    crn = _crn_from_netvlad(model_config, saved["model"])
    differences = [d for d in architecture_differences(model_config, saved["model"], keep_defaults=keep_defaults)
                   if not (crn and d.startswith("model.aggregation="))]
    if differences:
        raise ValueError(f"{run} was trained with another network: {', '.join(differences)}")
    model_config = model_config.copy_and_resolve_references()
    architecture = saved_architecture(saved["model"])
    for key in ARCHITECTURE_KEYS:
        if not (crn and key == "aggregation"):
            model_config[key] = architecture[key]
    model = geoloc_net.build(model_config, image_size)
    target = (geoloc_net.init_variables(model, image_size, seed) if crn  # the context module starts anew
              else geoloc_net.variable_shapes(model, image_size))
    print(f"Network from the {model_config.resume_checkpoint} checkpoint (step {step}) of the run in {run}: "
          f"{saved['model']['backbone']} + {saved['model']['aggregation']}"
          + (" (CRN's context module starts from scratch)" if crn else ""), flush=True)
    return model_config, model, pretrained.merge_variables(target, variables)

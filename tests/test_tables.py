"""The vocabulary tables in mmfm.config are complete: each entry has what the rest of the package derives from it."""

import dataclasses
import inspect
import typing

import pytest
from torch import nn

import mmfm
from mmfm.config import HEADS, MEDIA, OBJECTIVE_HEADS, SCHEDULERS, ModelConfig, import_object, objective_class
from mmfm.objective import Objective
from mmfm.train.config import TaskConfig


def _field_type(name: str) -> type:
    (inner,) = [t for t in typing.get_args(typing.get_type_hints(ModelConfig)[name]) if t is not type(None)]
    return inner


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_has_its_config_field_module_and_objectives(name):
    config_class = _field_type(name)
    assert dataclasses.is_dataclass(config_class) and callable(config_class.check)
    module = import_object(HEADS[name].module)
    assert inspect.ismethod(module.build)
    for objective in HEADS[name].objectives:
        cls = objective_class(objective)
        assert (
            issubclass(cls, Objective) and cls.loss_sum is not Objective.loss_sum and cls.needs is not Objective.needs
        )
        assert OBJECTIVE_HEADS[objective] == name


@pytest.mark.parametrize("modality", sorted(MEDIA))
def test_every_media_modality_has_its_config_field_encoder_and_processor(modality):
    assert dataclasses.is_dataclass(_field_type(modality))
    assert inspect.ismethod(import_object(MEDIA[modality].processor).for_encoder)
    assert issubclass(import_object(MEDIA[modality].encoder), nn.Module)


def test_the_model_builds_exactly_the_heads_its_config_names():
    model = mmfm.create_model("mmfm-test", classify=None)
    assert set(model.heads) == {n for n in HEADS if getattr(model.config, n) is not None} == set(HEADS) - {"classify"}


def test_recipes_accept_every_objective_and_the_old_denoise_name():
    assert set(typing.get_args(typing.get_type_hints(TaskConfig)["objective"])) == set(OBJECTIVE_HEADS)
    from mmfm.train.config import TrainConfig

    tasks = [{"name": "g", "objective": "denoise", "inputs": ["text"]}]
    with pytest.warns(FutureWarning, match="objective 'denoise' is now called 'image_gen'"):
        config = TrainConfig.from_dict({"data": {"train": "x.jsonl"}, "tasks": tasks})
    assert config.tasks[0].objective == "image_gen"


def test_the_scheduler_table_is_the_configs_vocabulary_and_builds_each_sampler():
    from mmfm.config import ImageGenHeadConfig
    from mmfm.heads.image_gen_schedulers import make_scheduler

    hint = typing.get_type_hints(ImageGenHeadConfig)["scheduler"]
    assert set(typing.get_args(hint)) == set(SCHEDULERS)
    for name, (class_name, _) in SCHEDULERS.items():
        assert type(make_scheduler(name, ImageGenHeadConfig())).__name__ == class_name

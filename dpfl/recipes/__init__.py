"""Recipes: how a config's ``task`` and ``data`` become objects, for built-in workloads and a
user's own alike.

A recipe is a task factory and a data factory over the run config. The built-in ones
(``classification``, ``asr``, ``localization``) register here exactly as a user's would, with
:func:`register`; a user may also name factories by import path
(``task = "mypkg.digits:make_task"``, ``data = "mypkg.digits:make_data"``), which receive the
``[task-options]`` table as keyword arguments (each the options its signature names). A data
factory (or a recipe's ``data``) that takes a ``user`` argument is called with the node's user
on a Flower SuperNode, so the node builds only its own user's data. :func:`resolve` is the one
place where names become objects.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpfl.api import FederatedDataset, Task, check_dataset, check_task
from dpfl.config import RunConfig, suggestion
from dpfl.loop.run import with_population  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Recipe:
    """A named workload: ``task(cfg)`` and ``data(cfg)`` build its objects from the run config;
    ``check(cfg)`` validates the keys it owns before anything is built. A ``data`` that takes a
    ``user`` keyword gets the node's user on a Flower SuperNode (``data(cfg, user=u)``) and should
    then read or generate only that user's examples, numbered as the whole federation numbers
    them."""

    name: str
    task: Callable[[RunConfig], Task]
    data: Callable[[RunConfig], FederatedDataset]
    check: Callable[[RunConfig], None] | None = None
    doc: str = ""


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Make ``recipe`` available by its name as a config's ``task``."""
    if ":" in recipe.name or not recipe.name:
        raise ValueError(f"a recipe name must be non-empty and have no ':', got {recipe.name!r}")
    RECIPES[recipe.name] = recipe
    return recipe


def is_import_path(name: str) -> bool:
    return ":" in name


def load_object(path: str, key: str) -> Any:
    """The object at ``"package.module:attribute"`` (attribute may be dotted); ValueError saying
    which part does not resolve."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"config key {key} = {path!r}: expected an import path 'package.module:attribute'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        where = f"module {err.name!r}" if err.name else f"module {module_name!r}"
        raise ValueError(
            f"config key {key} = {path!r}: cannot import {where} (is it installed, or on "
            "PYTHONPATH / the working folder?)"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ValueError(
                f"config key {key} = {path!r}: module {module_name!r} has no attribute "
                f"{attr!r} (no {part!r}){suggestion(part, names)}"
            )
        obj = getattr(obj, part)
    return obj


def _call(
    factory: Any, options: dict[str, Any], user: int | None = None
) -> tuple[Any, set[str]]:
    """Call ``factory`` with the task-options it accepts (and ``user``, when given and taken);
    (result, the options it took)."""
    if not callable(factory):
        return factory, set()  # an object named directly (a task or dataset instance)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        taken = dict(options)
    else:
        taken = {k: v for k, v in options.items() if k in params}
    if "user" in options:
        raise ValueError("config key task-options.user: 'user' is reserved (the node's user)")
    extra = {"user": user} if user is not None and "user" in params else {}
    return factory(**taken, **extra), set(taken)


def _built_in(cfg: RunConfig) -> Recipe:
    recipe = RECIPES.get(cfg.task)
    if recipe is None:
        raise ValueError(
            f"config key task = {cfg.task!r}: expected a built-in recipe ("
            + ", ".join(sorted(RECIPES))
            + ") or an import path 'package.module:factory'"
            + suggestion(cfg.task, RECIPES)
        )
    return recipe


def check(cfg: RunConfig) -> None:
    """Validate the task and the keys its recipe owns, before anything is built."""
    if is_import_path(cfg.task):
        if cfg.norm:
            raise ValueError(
                f"config key norm = {cfg.norm!r}: norm replaces the normalisation layers of a "
                "built-in recipe's model; a task given by import path builds its own model "
                "(set its layers there, or pass them through [task-options])"
            )
        if not cfg.data:
            raise ValueError(
                f"config key data: task = {cfg.task!r} is a task by import path, so data must "
                "name its federated dataset too ('package.module:factory')"
            )
        return
    recipe = _built_in(cfg)
    if cfg.task_options and not cfg.data:
        raise ValueError(
            f"config table task-options ({', '.join(cfg.task_options)}) is for tasks and data "
            f"given by import path; the built-in recipe {cfg.task!r} takes its own keys"
        )
    if recipe.check is not None:
        recipe.check(cfg)


@dataclass
class Resolved:
    """What a run is made of: the task, the federated dataset, and the config with
    ``population`` set to the dataset's number of users."""

    task: Any
    dataset: Any
    cfg: RunConfig


def _task(cfg: RunConfig) -> tuple[Any, set[str]]:
    if is_import_path(cfg.task):
        task, taken = _call(load_object(cfg.task, "task"), cfg.task_options)
    else:
        task, taken = _built_in(cfg).task(cfg), set()
    check_task(task)
    return task, taken


def _data(cfg: RunConfig, user: int | None = None) -> tuple[Any, set[str]]:
    if cfg.data:
        data, taken = _call(load_object(cfg.data, "data"), cfg.task_options, user)
    else:
        factory = _built_in(cfg).data
        takes_user = user is not None and "user" in inspect.signature(factory).parameters
        data, taken = (factory(cfg, user=user) if takes_user else factory(cfg)), set()
    check_dataset(data)
    return data, taken


def build_task(cfg: RunConfig) -> Any:
    """The task a config names (built-in recipe or import path)."""
    check(cfg)
    return _task(cfg)[0]


def build_data(cfg: RunConfig, user: int | None = None) -> Any:
    """The federated dataset a config names (its recipe's own, or ``data`` by import path;
    ``user``: the one user a node needs, passed to a factory that takes it)."""
    check(cfg)
    return _data(cfg, user)[0]


def resolve(cfg: RunConfig) -> Resolved:
    """Turn a config's names into objects: the one resolver of the CLI, TOML files and Flower."""
    check(cfg)
    task, task_taken = _task(cfg)
    data, data_taken = _data(cfg)
    unused = set(cfg.task_options) - task_taken - data_taken
    if unused:
        raise ValueError(
            f"config table task-options: {', '.join(sorted(unused))} taken by neither the task "
            f"factory {cfg.task!r} nor the data factory {cfg.data!r}"
        )
    return Resolved(task, data, with_population(cfg, data.num_users))


def _register_built_ins() -> None:
    from dpfl.recipes import asr, classification, localization

    for module in (classification, asr, localization):
        register(module.RECIPE)


_register_built_ins()

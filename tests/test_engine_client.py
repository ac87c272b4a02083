"""Both engines implement EngineClient (batcher/engine_client.py), the one surface api/ may use: every member, and
every method with the protocol's own parameters (names, kinds, defaults) and async-ness."""
from __future__ import annotations

import inspect
import subprocess

import pytest

from batcher.config import BatcherConfig
from batcher.engine import Engine
from batcher.engine_client import EngineClient, ModelInfo
from batcher.step_view import StepHub
from replicas.remote_engine import RemoteEngine
from tests.server_helpers import REPO

from .test_replicas import FakeHandle


def protocol_members() -> tuple[set[str], dict[str, object]]:
    """(data members, {method or property name: its declaration}) of EngineClient."""
    data = set(EngineClient.__annotations__)
    declared = {name: v for name, v in vars(EngineClient).items()
                if not name.startswith("_") and (callable(v) or isinstance(v, property))}
    return data, declared


def check_implements(engine) -> None:
    data, declared = protocol_members()
    for name in data:
        assert hasattr(engine, name), f"{type(engine).__name__} lacks {name}"
    for name, want in declared.items():
        have = inspect.getattr_static(type(engine), name, None)
        assert have is not None, f"{type(engine).__name__} lacks {name}()"
        if isinstance(want, property):
            assert isinstance(have, property), f"{type(engine).__name__}.{name} is not a property"
            continue
        ws, hs = inspect.signature(want), inspect.signature(have)
        shape = lambda s: [(p.name, p.kind, p.default) for p in s.parameters.values()]
        assert shape(hs) == shape(ws), f"{type(engine).__name__}.{name}{hs} != EngineClient.{name}{ws}"
        assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(want), name
    assert isinstance(engine, EngineClient)
    assert isinstance(engine.model_info, ModelInfo)


def test_engine_implements_engine_client(tiny_runner):
    engine = Engine(tiny_runner, BatcherConfig())
    check_implements(engine)
    assert engine.model_info.max_model_len == tiny_runner.max_model_len


def test_remote_engine_implements_engine_client():
    info = ModelInfo("fake", 64, 10, 16, "fake")
    check_implements(RemoteEngine(FakeHandle(), {"model_info": info, "tokenizer": None, "config_info": {}}))


def test_only_an_engine_in_this_process_has_steps_to_watch(tiny_runner):
    """The dashboard's capability (EngineClient.step_hub): a hub over the local engine; none over replicas."""
    engine = Engine(tiny_runner, BatcherConfig())
    hub = engine.step_hub(2, 8)
    assert isinstance(hub, StepHub) and hub.engine is engine and (hub.max_viewers, hub.buffer_events) == (2, 8)
    info = ModelInfo("fake", 64, 10, 16, "fake")
    assert RemoteEngine(FakeHandle(), {"model_info": info, "tokenizer": None, "config_info": {}}).step_hub(2, 8) is None


def test_api_reaches_no_runner():
    """The HTTP layer asks the engine, never its runner (a RemoteEngine has none)."""
    found = subprocess.run(["grep", "-rnE", r"engine\.runner|\.runner\.", "api/"], cwd=REPO, capture_output=True,
                           text=True).stdout
    assert not found, found

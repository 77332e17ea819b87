"""Shared fixtures: one bare q35 QEMU 7.2 and one mount of it per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import VM, Mount, mounted, qemu_vm


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    with qemu_vm(tmp_path_factory.mktemp("vm")) as machine:
        yield machine


@pytest.fixture(scope="module")
def mnt(vm: VM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(vm.socket, tmp_path_factory.mktemp("mnt") / "qom") as m:
        yield m


@pytest.fixture(params=["7.2", "11.1"])
def anyvm(request: pytest.FixtureRequest) -> VM:
    """The module's QEMU 7.2 VM, or the QEMU 11.1 one."""
    name = "vm" if request.param == "7.2" else "vm11"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path

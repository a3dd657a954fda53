"""A real Kubernetes control plane for the chart tests: etcd, kube-apiserver and
kube-controller-manager v1.20 from the cache `make k8s-local` fills (deploy/k8s-local/setup.sh),
started fresh on free ports for one test session and stopped with everything it started.

The controller manager is there for what an API server alone does not do: the garbage collector
(an uninstall must not leave orphaned ReplicaSets or pods behind) and the StatefulSet controller
(volume claims from `volumeClaimTemplates`, which outlive the release by Kubernetes' design)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx

from tests.deploy.chart import ROOT

# Where `make k8s-local` puts it (the Makefile's K8S_CACHE, passed on by `make test`).
CACHE = Path(os.environ.get("LLMOPS_K8S_CACHE") or (
    "/var/cache/llmops-k8s" if os.geteuid() == 0 else Path.home() / ".cache/llmops/k8s"))
BIN = CACHE / "bin"
ETCD = CACHE / "root" / "usr" / "bin" / "etcd"
SETUP = ROOT / "deploy" / "k8s-local" / "setup.sh"
SERVICE_RANGE = "10.0.0.0/24"

Obj = dict[str, Any]


class ClusterError(RuntimeError):
    """The local control plane could not be built, started or asked."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(what: str, check: Callable[[], bool], timeout: float,
               alive: Callable[[], str | None] = lambda: None) -> None:
    """Poll `check` until it holds; `alive` names a dead process to fail early on."""
    deadline = time.monotonic() + timeout
    while not check():
        if (dead := alive()) is not None:
            raise ClusterError(f"waiting for {what}: {dead}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


def require_binaries() -> None:
    missing = [p for p in (ETCD, BIN / "kube-apiserver", BIN / "kube-controller-manager",
                           BIN / "kubectl") if not os.access(p, os.X_OK)]
    if missing:
        raise ClusterError(
            f"no local Kubernetes build in {CACHE} (missing {', '.join(p.name for p in missing)}):"
            " run `make k8s-local` once (about 5 minutes on 2 cores, cached afterwards)")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(pki: Path) -> None:
    """A throwaway CA, the API server's serving certificate and an admin (system:masters)
    client certificate, plus the service-account signing key pair."""
    pki.mkdir(parents=True)
    (pki / "server.ext").write_text(
        "subjectAltName=DNS:localhost,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.0.0.1\n"
        "extendedKeyUsage=serverAuth\n")
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "2", "-subj", "/CN=llmops-test-ca", cwd=pki)
    for name, subject, ext in (("apiserver", "/CN=kube-apiserver", "server.ext"),
                               ("admin", "/O=system:masters/CN=admin", "client.ext")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", subject, cwd=pki)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext,
                 cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


@dataclass
class Cluster:
    """A running control plane: its address, admin kubeconfig and processes."""

    home: Path
    url: str
    kubeconfig: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig),
                               *args], input=stdin, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done

    def get(self, resource: str, namespace: str | None = None, *selector: str) -> list[Obj]:
        """Objects of one or more resources (`kubectl get a,b`), optionally by label."""
        where = ["-n", namespace] if namespace else []
        out = self.kubectl("get", resource, *where, *(["-l", ",".join(selector)]
                                                     if selector else []), "-o", "json").stdout
        items: list[Obj] = json.loads(out)["items"]
        return items

    def api_versions(self) -> set[str]:
        return set(self.kubectl("api-versions").stdout.split())

    def helm(self, namespace: str) -> helm.Config:
        return helm.Config(kubeconfig_path=self.kubeconfig, namespace=namespace)

    def dead(self) -> str | None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                return f"{name} exited ({proc.returncode}): {self.log(name)}"
        return None

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""


def _start(cluster: Cluster, name: str, argv: list[str]) -> None:
    with (cluster.home / f"{name}.log").open("wb") as log:
        # A session of its own, so that stopping it never signals the test runner's group.
        cluster.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _readyz(url: str, pki: Path) -> bool:
    tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    tls.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        response = httpx.get(f"{url}/readyz", verify=tls, timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


@contextmanager
def control_plane(home: Path) -> Iterator[Cluster]:
    """etcd, kube-apiserver and kube-controller-manager on free ports under `home`; all three
    are stopped (and their data left in `home`) when the block ends."""
    require_binaries()
    pki = home / "pki"
    make_pki(pki)
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    url = f"https://127.0.0.1:{api_port}"
    kubeconfig = home / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {
            "server": url, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": "admin", "user": {"client-certificate": str(pki / "admin.crt"),
                                             "client-key": str(pki / "admin.key")}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}]}))
    cluster = Cluster(home=home, url=url, kubeconfig=kubeconfig)
    with ExitStack() as stack:
        @stack.callback
        def stop_all() -> None:
            for proc in reversed(cluster.processes.values()):
                _stop(proc)

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        _start(cluster, "etcd", [
            str(ETCD), "--name", "llmops-test", "--data-dir", str(home / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"llmops-test=http://127.0.0.1:{peer_port}",
            "--log-level", "warn"])
        _start(cluster, "kube-apiserver", [
            str(BIN / "kube-apiserver"), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}", "--insecure-port=0",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_RANGE}", "--authorization-mode=Node,RBAC",
            f"--cert-dir={home / 'apiserver-certs'}", "--allow-privileged=true",
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            "--kubelet-preferred-address-types=Hostname",
            # One test session, one client: no need for the default watch caches' memory.
            "--watch-cache=false", "--v=1"])
        wait_until("the API server's /readyz", lambda: _readyz(url, pki), 90, cluster.dead)
        _start(cluster, "kube-controller-manager", [
            str(BIN / "kube-controller-manager"), f"--kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", "--port=0", "--secure-port=0", "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}", "--use-service-account-credentials=false",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            # No autoscaler: no metrics API serves here, and tests scale workloads themselves
            # (as an autoscaler would) to see what an upgrade does to the count.
            "--controllers=*,-nodeipam,-horizontalpodautoscaling", "--v=1"])
        wait_until("the controller manager's default ServiceAccount",
                   lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", "default",
                                           check=False).returncode == 0, 60, cluster.dead)
        yield cluster

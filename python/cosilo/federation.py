"""Federations on one machine, driven from Python: declare, provision, start, watch, stop.

The sites are real ``cosilo run`` processes of the ``cosilo`` binary; provisioning is
``cosilo federation local`` (each member's secret keys are made in its own folder and never
copied; the operator folder holds only the CA). An external Mosquitto is started from the
configuration provisioning wrote (mutual TLS, ACL, CRL).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ._cosilo import CosiloError, Declaration, Observer, hold_session

PathLike = Union[str, "os.PathLike[str]"]

MOSQUITTO = "/usr/sbin/mosquitto"


def find_cosilo(explicit: Optional[PathLike] = None) -> Path:
    """The ``cosilo`` binary: ``explicit``, ``$COSILO_BIN``, ``cosilo`` on ``PATH``, or a
    release build in this source tree (``target/release/cosilo``)."""
    candidates: List[Optional[str]] = [
        str(explicit) if explicit else None,
        os.environ.get("COSILO_BIN"),
        shutil.which("cosilo"),
    ]
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidates.append(str(parent / "target" / "release" / "cosilo"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise CosiloError(
        "no cosilo binary: build it with `cargo build --release -p cosilo-appliance`, "
        "or set COSILO_BIN"
    )


def _run(cmd: Sequence[str], what: str) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True)
    if p.returncode != 0:
        raise CosiloError(f"{what} failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def declare(
    path: PathLike,
    name: str,
    sites: Iterable[str],
    *,
    strategy: Optional[Mapping[str, object]] = None,
    model: Optional[Mapping[str, object]] = None,
    broker: str = "mosquitto",
    host: str = "localhost",
    port: Optional[int] = None,
    security: str = "mtls",
    observers: Iterable[str] = ("notebook",),
    max_packet_bytes: int = 1 << 20,
) -> Declaration:
    """Writes a ``federation.toml`` and returns it parsed and validated.

    ``strategy`` holds ``kind`` (``fedavg``, ``braintorrent``, ``gossip-avg``, ``ciil``, ``iil``,
    ``local``) and
    hyper-parameters (``rounds``, ``steps_per_round``, ``quorum``, ...); ``model`` the U-Net
    settings (``base``, ``depth``, ``batch_size``, ``patch``, ``seed``, ``lr``). ``broker`` is
    ``mosquitto`` (external, provisioned with ``security``) or ``embedded`` (on the first site,
    plain TCP, ``security`` must be ``none``). ``port`` defaults to a free one. Each site trains
    on the store's cases of the hospital with its id.
    """
    sites = list(sites)
    port = port or free_port()
    lines = ["[federation]", f"name = {_toml_value(name)}", f"security = {_toml_value(security)}", ""]
    lines.append("[strategy]")
    for k, v in (strategy or {"kind": "fedavg"}).items():
        lines.append(f"{k} = {_toml_value(v)}")
    lines.append("")
    if model:
        lines.append("[model]")
        for k, v in model.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    lines += [
        "[broker]",
        f"kind = {_toml_value(broker)}",
        f"host = {_toml_value(host)}",
        f"port = {port}",
        f"max_packet_bytes = {max_packet_bytes}",
    ]
    if broker == "embedded" and sites:
        lines.append(f"on_site = {_toml_value(sites[0])}")
    lines.append("")
    for s in sites:
        lines += ["[[site]]", f"id = {_toml_value(s)}", f"hospital = {_toml_value(s)}", ""]
    for o in observers:
        lines += ["[[observer]]", f"id = {_toml_value(o)}", ""]
    text = "\n".join(lines)
    decl = Declaration.parse(text)  # raises CosiloError before anything is written
    Path(path).write_text(text)
    return decl


class Federation:
    """A declared federation provisioned into a folder on this machine.

    ``Federation.provision("federation.toml", "trial/")`` runs ``cosilo federation local``;
    ``start()`` starts the broker (an external Mosquitto) and one ``cosilo run`` per site;
    ``observe()`` returns an :class:`Observer`; ``status()``, ``wait()`` and ``stop()`` follow
    the processes.
    """

    def __init__(self, declaration: PathLike, folder: PathLike, cosilo: Optional[PathLike] = None):
        self.declaration_path = Path(declaration)
        self.declaration = Declaration.load(str(self.declaration_path))
        self.folder = Path(folder)
        self.cosilo = find_cosilo(cosilo)
        self.operator = self.folder / "operator"
        self.processes: Dict[str, subprocess.Popen] = {}
        self._logs: Dict[str, object] = {}
        self.broker: Optional[subprocess.Popen] = None

    @classmethod
    def provision(
        cls, declaration: PathLike, folder: PathLike, cosilo: Optional[PathLike] = None
    ) -> "Federation":
        """Provisions every member of ``declaration`` under ``folder``: the operator folder
        (CA, roster, kits, broker configuration) and one folder per member, whose keys are made
        there. Returns the federation, ready to :meth:`start`."""
        fed = cls(declaration, folder, cosilo)
        _run(
            [str(fed.cosilo), "federation", "local", str(fed.declaration_path), "--dir", str(fed.folder)],
            "cosilo federation local",
        )
        return fed

    @property
    def sites(self) -> List[str]:
        """The site ids."""
        return self.declaration.sites

    def site_folder(self, site: str) -> Path:
        """A member's folder (keys, kit, ``site.toml``, ``store/``, logs)."""
        return self.folder / site

    def store(self, site: str) -> Path:
        """A site's store folder."""
        return self.site_folder(site) / "store"

    def import_cohort(self, manifest: PathLike) -> None:
        """Imports each site's hospital (the cohort's hospital with the site's id) into its
        store with ``cosilo import``."""
        for s in self.sites:
            _run(
                [str(self.cosilo), "import", "--store", str(self.store(s)), "--manifest", str(manifest), "--hospital", s],
                f"importing {s}'s cases",
            )

    def start_broker(self, timeout: float = 20.0) -> None:
        """Starts the external Mosquitto with the provisioned configuration (persistence and log
        in the operator folder). Nothing to do for an embedded broker."""
        if self.declaration.broker_kind != "mosquitto" or self.broker is not None:
            return
        conf = (self.operator / "mosquitto" / "mosquitto.conf").read_text()
        run = self.operator / "mosquitto" / "run"
        run.mkdir(exist_ok=True)
        extra = [
            "persistence true",
            f"persistence_location {run}/",
            f"log_dest file {run}/mosquitto.log",
        ]
        if os.geteuid() == 0:
            extra.append("user root")
        path = run / "mosquitto.conf"
        path.write_text("\n".join(extra) + "\n" + conf)
        self.broker = subprocess.Popen(
            [MOSQUITTO, "-c", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _wait_port(self.declaration.broker_port, timeout, self.broker)

    def start(self, threads: int = 1, hold_sessions: bool = True) -> None:
        """Starts the broker (if external) and one ``cosilo run`` per site (logs in
        ``{site}/run.log``, summary in ``{site}/summary.json``). With ``hold_sessions``, each
        site's persistent broker session is created first, so no round update is lost to a
        site that connects late."""
        self.start_broker()
        if hold_sessions and self.declaration.broker_kind == "mosquitto":
            for s in self.sites:
                hold_session(str(self.site_folder(s)))
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
        for s in self.sites:
            folder = self.site_folder(s)
            summary = folder / "summary.json"
            if summary.exists():
                summary.unlink()
            log = open(folder / "run.log", "w")
            self._logs[s] = log
            self.processes[s] = subprocess.Popen(
                [str(self.cosilo), "run", "--config", str(folder / "site.toml"), "--summary", str(summary)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )

    def observe(self, observer: Optional[str] = None) -> Observer:
        """A read-only observer of the broker (the declaration's first observer by default)."""
        ids = self.declaration.observers
        if observer is None:
            if not ids:
                raise CosiloError("the declaration has no [[observer]]")
            observer = ids[0]
        return Observer(str(self.site_folder(observer)))

    def summary(self, site: str) -> Optional[dict]:
        """The summary a finished site wrote (rounds, Dice, bytes), else None."""
        p = self.site_folder(site) / "summary.json"
        return json.loads(p.read_text()) if p.exists() else None

    def status(self) -> Dict[str, dict]:
        """Per site: ``running``, ``returncode`` and, once finished, ``summary``."""
        out = {}
        for s in self.sites:
            p = self.processes.get(s)
            rc = p.poll() if p else None
            out[s] = {"running": p is not None and rc is None, "returncode": rc, "summary": self.summary(s)}
        return out

    def log(self, site: str) -> str:
        """A site's log so far."""
        p = self.site_folder(site) / "run.log"
        return p.read_text() if p.exists() else ""

    def wait(self, timeout: float = 600.0) -> Dict[str, dict]:
        """Waits until every site has exited; raises CosiloError on a failed site or timeout."""
        deadline = time.monotonic() + timeout
        for s, p in self.processes.items():
            left = max(0.0, deadline - time.monotonic())
            try:
                rc = p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                raise CosiloError(f"{s} still runs after {timeout} s; its log ends:\n{self.log(s)[-2000:]}")
            if rc != 0:
                raise CosiloError(f"{s} exited with {rc}; its log ends:\n{self.log(s)[-2000:]}")
        return self.status()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the sites (SIGTERM: they checkpoint and leave cleanly) and the broker."""
        for p in self.processes.values():
            if p.poll() is None:
                p.terminate()
        for p in self.processes.values():
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs.values():
            f.close()
        self._logs.clear()
        if self.broker is not None:
            self.broker.terminate()
            try:
                self.broker.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait()
            self.broker = None

    def export(self, site: str, out: PathLike) -> Path:
        """Exports a finished site's federated model as a bundle (``cosilo export``)."""
        run = f"fed-{self.declaration.name}-{self.declaration.strategy}"
        _run(
            [str(self.cosilo), "export", "--store", str(self.store(site)), "--run", run, "--out", str(out)],
            f"exporting {site}'s model",
        )
        return Path(out)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise CosiloError(f"mosquitto exited with {proc.returncode}: {err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise CosiloError(f"mosquitto did not listen on port {port} within {timeout} s")

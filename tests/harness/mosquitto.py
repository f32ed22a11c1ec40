"""A real Mosquitto broker for tests, on a free 127.0.0.1 port with its own state.

Persistence is on and saved after every change, so `restart()` -- graceful or a
SIGKILL -- keeps retained sessions and their queued QoS 1 messages, which is
exactly what the bus tests need to prove "nothing lost".
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness.util import free_port, wait_until

MOSQUITTO_BIN = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD_BIN = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


@dataclass
class Mosquitto:
    root: Path
    port: int = field(default_factory=free_port)
    users: dict[str, str] | None = None  # username -> password; None: anonymous allowed
    acl: str | None = None  # acl_file text (mosquitto's format), if any
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "mosquitto.log"

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            # as root, mosquitto would otherwise drop to user 'mosquitto' and lose access
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "persistence true",
            f"persistence_location {data}/",
            "autosave_interval 1",
            "autosave_on_changes true",  # save after every change: a kill loses nothing
            "max_queued_messages 100000",  # default 1000 would drop QoS 1 for slow sessions
            "max_inflight_messages 20",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "sys_interval 1",  # $SYS counters (sessions, clients) fresh within a second
        ]
        if self.users:
            pwfile = self.root / "passwords"
            pwfile.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD_BIN, "-b", str(pwfile), user, password],
                    check=True,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            aclfile = self.root / "acl"
            aclfile.write_text(self.acl)
            lines.append(f"acl_file {aclfile}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        self.write_config()
        self.proc = subprocess.Popen(
            [MOSQUITTO_BIN, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            wait_until(self._ready, timeout=10, what=f"mosquitto on port {self.port}")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self.log_tail()}") from None
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the broker; graceful (SIGTERM, saves state) unless `kill` (SIGKILL)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self, kill: bool = False) -> None:
        """Stop and start again on the same port with the same persistent state."""
        self.stop(kill=kill)
        wait_until(self._port_free, timeout=10, what=f"port {self.port} to be released")
        self.start()

    def _port_free(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError:
                return False
            return True

    def sys_value(self, topic: str, timeout: float = 5) -> str | None:
        """One `$SYS/broker/...` value (published every second, see `sys_interval`)."""
        got: list[str] = []
        done = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        client.on_connect = lambda c, *_: c.subscribe(topic)
        client.on_message = lambda _c, _u, msg: (got.append(msg.payload.decode()), done.set())
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        try:
            done.wait(timeout)
        finally:
            client.disconnect()
            client.loop_stop()
        return got[0] if got else None

    def offline_sessions(self) -> int:
        """Persistent sessions the broker keeps for clients not connected now."""
        value = self.sys_value("$SYS/broker/clients/disconnected")
        return int(value) if value is not None else -1

    def end_session(self, client_id: str) -> None:
        """What the README tells an operator to do with a retired instance's session,
        as `mosquitto_sub -V mqttv5 -i ID -t retire -W 1` does it: connect under its id
        with a clean start and no session expiry, then leave."""
        connected = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id, protocol=paho.MQTTv5)
        client.on_connect = lambda *_: connected.set()
        client.connect("127.0.0.1", self.port, clean_start=True)
        client.loop_start()
        try:
            assert connected.wait(5), f"could not connect as {client_id}"
        finally:
            client.disconnect()
            client.loop_stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

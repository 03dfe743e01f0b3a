"""The local stack without Docker: a real Kafka broker (KRaft) and a real redis-server.

Kafka comes from Maven Central jars fetched once by ``kafka/pom.xml`` (package data
beside this module) into the user's cache directory; Redis is Debian's
``redis-server``. Both listen on free loopback ports. Ready means usable: the admin
client lists topics, Redis answers PING. The test session fixtures and
``riverflow stack up`` share this.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from riverflow.errors import RiverflowError
from riverflow.settings import Settings

# package data: Maven runs it from any directory
POM = Path(str(files("riverflow.tools").joinpath("kafka", "pom.xml")))
NO_JAVA = "Java 17+ is needed to run the Kafka broker: apt-get install openjdk-17-jre-headless"

LOG4J2_PROPERTIES = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class StackError(RiverflowError):
    """A server of the local stack could not be fetched, started or reached."""


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM every process still running, then wait for each; SIGKILL the ones
    that have not stopped within ``timeout_s``."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int, taken: Collection[int] = ()) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that nothing is bound to right now, none of
    ``taken``.

    Picked at random below the kernel's ephemeral range (``ip_local_port_range``,
    32768-60999 by default) when it leaves room: a port the kernel hands out for
    ``bind(0)`` can be taken, once let go, as the local port of any outgoing
    connection before the server it was picked for binds it (seen in CI: a stage
    exited with EADDRINUSE on the metrics port picked for it while other processes
    connected to the broker). Ports below that range are only ever taken by a server
    that binds them by number. Held open together while picked, so none repeats."""
    low = ephemeral_ports()[0]
    held: list[socket.socket] = []
    try:
        ports: list[int] = []
        for _ in range(1000 + n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            try:
                s.bind(("127.0.0.1", _PICK.randrange(PICK_FROM, low) if low > PICK_FROM else 0))
            except OSError:
                continue  # bound or lingering: another
            port = int(s.getsockname()[1])
            if port not in taken:
                ports.append(port)
            if len(ports) == n:
                return ports
        raise OSError(f"no {n} free ports found on 127.0.0.1")
    finally:
        for s in held:
            s.close()


PICK_FROM = 20000  # free_ports' lowest pick: well clear of the ports services are known by
_PICK = random.Random()


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux; the default
    range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def kafka_libs(settings: Settings) -> Path:
    """The folder of broker jars, fetched with Maven on first use and cached after.

    Processes that start a broker at once on a fresh machine (the test session's
    workers, each with its own broker) fetch once: the first holds a lock on the
    cache while Maven runs, the others wait and find the jars. Maven copies into a
    folder of its own, moved into place only when complete, so a fetch that failed
    or was killed leaves no half-copied jar for the next start to take as cached
    (Maven's copy does not overwrite a release jar already there)."""
    root = settings.cache_dir / f"kafka-{settings.kafka_version}"
    libs = root / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None:
        raise StackError(
            "Maven (mvn) is needed once to fetch the Kafka jars: apt-get install maven"
        )
    if shutil.which("java") is None:
        raise StackError(NO_JAVA)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if marker.exists():  # another process fetched them while this one waited
            return libs
        partial = root / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        # Maven runs on a copy in the cache: the installed package may be read-only
        pom = root / "pom.xml"
        pom.write_text(POM.read_text())
        cmd = [
            "mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}", f"-Dkafka.version={settings.kafka_version}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise StackError(
                f"fetching Kafka jars failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        (partial / ".complete").touch()
        shutil.rmtree(libs, ignore_errors=True)  # what an older, unfinished fetch left
        partial.rename(libs)
    return libs


@dataclass
class ServerProcess:
    """A server we started: its process id, address and log file, and what it keeps
    on disk (``durability``)."""

    name: str
    pid: int
    address: str
    log: Path
    durability: str = ""

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1].split("/")[0])

    def found(self) -> ServerProcess:
        """This server as it runs now: the process listening on its port, which a
        restart by hand may have replaced (same port, another pid)."""
        pid = pid_listening_on(self.port)
        if pid is None or pid == self.pid or not _runs(pid, _SERVER_MARK[self.name]):
            return self  # nothing there, or something that is not our kind of server
        return ServerProcess(self.name, pid, self.address, self.log, self.durability)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # A zombie child still answers kill(0); reap it if it is ours.
        try:
            reaped, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return reaped == 0

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the broker's clean shutdown hook), SIGKILL after ``timeout_s``."""
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)


# what a server's command line holds: `stack down` stops only such a process
_SERVER_MARK = {"kafka": "kafka.Kafka", "redis": "redis-server"}


def _runs(pid: int, mark: str) -> bool:
    """Whether process ``pid``'s command line contains ``mark``."""
    try:
        return mark.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def pid_listening_on(port: int) -> int | None:
    """The process listening on TCP ``port`` (any local address), read from /proc:
    the socket's inode in /proc/net/tcp{,6}, then the process holding it. None if
    nothing listens there or the process is not ours to inspect."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(proc.name)
        except OSError:  # gone meanwhile, or another user's
            continue
    return None


def _spawn(cmd: list[str], log: Path, cwd: Path) -> int:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    return proc.pid


@dataclass(frozen=True)
class SecureKafka:
    """A broker's SASL_SSL listener: TLS with a certificate ``ca_file`` signed (for
    127.0.0.1 and localhost), SCRAM-SHA-512 logins for ``users`` (name -> password),
    and the KRaft ``StandardAuthorizer``: a user may do only what an ACL allows,
    except the super user ``admin`` (the first of ``users``)."""

    ca_file: Path
    keystore: Path  # the broker's key and certificate (PEM)
    users: dict[str, str]
    # an SSL listener that requires a client certificate (mTLS): its port, and a
    # certificate and key per user (subject CN=<user>: the principal User:CN=<user>)
    ssl_port: int = 0
    client_certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    @property
    def admin(self) -> str:
        return next(iter(self.users))

    def client(self, user: str | None = None) -> dict[str, Any]:
        """librdkafka settings of a client logging in as ``user`` (default: admin)."""
        name = user or self.admin
        return {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": name, "sasl.password": self.users[name],
                "ssl.ca.location": str(self.ca_file)}  # fmt: skip


def make_secure_kafka(workdir: Path, users: dict[str, str]) -> SecureKafka:
    """A throwaway CA, the broker's certificate it signs, and the SCRAM users to create
    (``users``: the first is the super user). Needs ``openssl``."""
    workdir.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], cwd=workdir, capture_output=True, text=True,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise StackError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=riverflow test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout",
            "broker.key", "-out", "broker.csr")  # fmt: skip
    (workdir / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
            "-out", "broker.pem")  # fmt: skip
    openssl("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.pk8")
    keystore = workdir / "broker-keystore.pem"
    keystore.write_text((workdir / "broker.pk8").read_text() + (workdir / "broker.pem").read_text())
    certs = {}
    for name in users:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.pem")  # fmt: skip
        certs[name] = (workdir / f"{name}.pem", workdir / f"{name}.key")
    return SecureKafka(workdir / "ca.pem", keystore, dict(users), free_port(), certs)


def start_kafka(
    settings: Settings,
    workdir: Path,
    timeout_s: float = 90.0,
    ports: tuple[int, int] | None = None,
    secure: SecureKafka | None = None,
) -> ServerProcess:
    """Format and start a single-node KRaft broker (combined mode) on ``ports`` (broker,
    controller; default: free ones). Started again on the same ports and ``workdir``,
    it is the same broker again: its cluster id and data stay. ``secure``: clients
    connect over SASL_SSL, with ACLs (the broker itself uses a loopback PLAINTEXT
    listener of its own)."""
    if shutil.which("java") is None:
        raise StackError(NO_JAVA)
    libs = kafka_libs(settings)
    workdir.mkdir(parents=True, exist_ok=True)
    # (the secure broker's SSL port was picked before: the others must differ from it)
    ssl_port = () if secure is None else (secure.ssl_port,)
    port, cport = ports or free_ports(2, taken=ssl_port)
    log = workdir / "kafka.log"
    props = workdir / "server.properties"
    if secure is None:
        listeners = [
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        ]
    else:
        internal = free_ports(1, taken=(port, cport, *ssl_port))[0]
        ssl = secure.ssl_port
        plain_users = " ".join(f'user_{name}="{pw}"' for name, pw in secure.users.items())
        listeners = [
            f"listeners=SASL_SSL://127.0.0.1:{port},SSL://127.0.0.1:{ssl},"
            f"INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners=SASL_SSL://127.0.0.1:{port},SSL://127.0.0.1:{ssl},"
            f"INTERNAL://127.0.0.1:{internal}",
            "inter.broker.listener.name=INTERNAL",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,"
            "SASL_SSL:SASL_SSL,SSL:SSL",
            # SCRAM as the stages log in; PLAIN as managed clusters' API keys do
            "sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.sasl_ssl.plain.sasl.jaas.config="
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={secure.keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={secure.ca_file}",
            "listener.name.ssl.ssl.client.auth=required",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            # the broker's own listeners (loopback) and the admin; nobody else without an ACL
            f"super.users=User:ANONYMOUS;User:{secure.admin}",
            "allow.everyone.if.no.acl.found=false",
        ]
    props.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.bootstrap.servers=127.0.0.1:{cport}",
                *listeners,
                "controller.listener.names=CONTROLLER",
                f"log.dirs={workdir / 'data'}",
                "num.partitions=1",
                "num.network.threads=2",
                "num.io.threads=2",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                # a dead exactly-once scorer's open transaction is aborted within a
                # second of its timeout (default 10 s later): its partitions' next
                # owner waits for that when offsets were pending in it
                "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=false",
                "message.max.bytes=4194304",
                "",
            ]
        )
    )
    log4j = workdir / "log4j2.properties"
    log4j.write_text(LOG4J2_PROPERTIES.format(log=workdir / "server.log"))
    java = ["java", *shlex.split(settings.kafka_jvm_options), f"-Dlog4j2.configurationFile={log4j}",
            "-cp", f"{libs}/*"]  # fmt: skip
    if not (workdir / "data" / "meta.properties").exists():  # else: formatted, a restart
        scram = [] if secure is None else [
            arg for name, password in secure.users.items()
            for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")
        ]  # fmt: skip
        _format_kafka(java, props, scram)
    pid = _spawn([*java, "kafka.Kafka", str(props)], log, workdir)
    server = ServerProcess("kafka", pid, f"127.0.0.1:{port}", workdir / "server.log")
    client = None if secure is None else secure.client()
    return _ready_or_stopped(
        server, lambda: wait_for_kafka(server.address, timeout_s, server, client)
    )


def _format_kafka(java: list[str], props: Path, extra: Sequence[str] = ()) -> None:
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    fmt = subprocess.run(
        # "--cluster-id=" because a base64 id may start with "-" and read as an option
        [*java, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(props),
         "--standalone", "--ignore-formatted", *extra],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if fmt.returncode != 0:
        raise StackError(f"kafka storage format failed:\n{fmt.stdout}{fmt.stderr}")


def _wait_ready(
    what: str, probe: Callable[[], object], timeout_s: float, server: ServerProcess | None
) -> None:
    """Poll ``probe`` until it returns without raising; fail early if the server died."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server is not None and not server.alive():
            raise StackError(f"{what} exited during start; log tail:\n{tail(server.log)}")
        try:
            probe()
            return
        except Exception as exc:  # whatever the client raises while the server boots
            last = exc
            time.sleep(0.2)
    log_tail = tail(server.log) if server else ""
    raise StackError(f"{what} not ready after {timeout_s}s ({last})\n{log_tail}")


def _ready_or_stopped(server: ServerProcess, wait: Callable[[], None]) -> ServerProcess:
    try:
        wait()
    except StackError:
        server.stop(5)
        raise
    return server


def wait_for_kafka(
    bootstrap: str,
    timeout_s: float,
    server: ServerProcess | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Return once an admin client lists topics on ``bootstrap`` (``config``: its own
    settings, else the process's security settings)."""
    from confluent_kafka.admin import AdminClient

    from riverflow.streams.kafka_io import client_config

    settings = {"bootstrap.servers": bootstrap, **config} if config else client_config(bootstrap)
    admin = AdminClient({**settings, "log_level": 0})
    _wait_ready(f"kafka at {bootstrap}", lambda: admin.list_topics(timeout=2), timeout_s, server)


REDIS_DURABILITY = "AOF, fsync every second"
# what every Redis the stack starts (single or a cluster's node) runs with: durable
# (append-only, fsync every second), never evicting, expired keys freed in the
# background, and the append-only file rewritten after 1 GB of growth, not 64 MB
# (``start_redis``; docs/operations.md)
_REDIS_SETTINGS = (
    "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
    "--maxmemory-policy", "noeviction", "--lazyfree-lazy-expire", "yes",
    "--auto-aof-rewrite-min-size", "1gb",
)  # fmt: skip


def start_redis(workdir: Path, timeout_s: float = 20.0, port: int | None = None) -> ServerProcess:
    """Start redis-server on a free loopback port (or ``port``) with its own directory.

    Durable: an append-only file fsynced every second (``appendonly yes``,
    ``appendfsync everysec``) in ``workdir``, so a restart keeps the registry, the
    checkpoint and the snapshots (a crash loses at most the last second); started
    again on the same directory, it reads them back. The file is rewritten once it
    has grown by 1 GB (and doubled), not Redis' 64 MB: a scorer's ~10 MB a second
    at 13,000 events/s had a forked child rewrite it every few seconds, on a core
    the scorer needed (docs/benchmarks.md).
    """
    exe = shutil.which("redis-server")
    if exe is None:
        raise StackError(
            "redis-server not found: install Debian's package (apt-get install redis-server) "
            "or point RIVERFLOW_REDIS_URL at a running Redis"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = workdir / "redis.log"
    cmd = [
        exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
        *_REDIS_SETTINGS, "--protected-mode", "yes", "--logfile", str(log),
    ]  # fmt: skip
    pid = _spawn(cmd, workdir / "redis.stdout", workdir)
    server = ServerProcess("redis", pid, f"redis://127.0.0.1:{port}/0", log, REDIS_DURABILITY)
    return _ready_or_stopped(server, lambda: wait_for_redis(server.address, timeout_s, server))


def wait_for_redis(url: str, timeout_s: float, server: ServerProcess | None = None) -> None:
    """Return once Redis at ``url`` answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1)
    _wait_ready(f"redis at {url}", client.ping, timeout_s, server)


@dataclass
class Endpoints:
    """Where the stages find Kafka and Redis."""

    kafka_bootstrap: str
    redis_url: str
    logs: tuple[Path, ...] = ()  # server logs of the servers we started
    pids: dict[str, int] = field(default_factory=dict)  # and their process ids


@contextmanager
def local_stack(settings: Settings, workdir: Path) -> Iterator[Endpoints]:
    """Use the servers named in settings, or start our own for the duration."""
    started: list[ServerProcess] = []
    try:
        bootstrap = settings.kafka_bootstrap
        if bootstrap:
            wait_for_kafka(bootstrap, 30)
        else:
            started.append(start_kafka(settings, workdir / "kafka"))
            bootstrap = started[-1].address
        redis_url = settings.redis_url
        if redis_url:
            wait_for_redis(redis_url, 10)
        else:
            started.append(start_redis(workdir / "redis"))
            redis_url = started[-1].address
        yield Endpoints(
            bootstrap, redis_url, tuple(s.log for s in started), {s.name: s.pid for s in started}
        )
    finally:
        for server in reversed(started):
            server.stop()


# -- `riverflow stack up | down | status`: a stack that outlives the command ----------


def _state_file(settings: Settings) -> Path:
    return settings.cache_dir / "stack" / "state.json"


def stack_up(settings: Settings, secure_for: Path | None = None) -> Endpoints:
    """Start Kafka and Redis in the background and remember them for ``stack down``.

    ``secure_for``: a secured stack for the pipeline of that spec file
    (``secure_stack``), its identities' settings written to
    ``{cache_dir}/stack/env/*.env``."""
    state = _state_file(settings)
    if state.exists():
        running = stack_status(settings)
        data = json.loads(state.read_text())
        same = bool(data.get("secure")) == (secure_for is not None)
        if same and running and all(s.alive() for s in running):
            return Endpoints(data["kafka"]["address"], data["redis"]["address"])
        stack_down(settings)
    root = state.parent
    shutil.rmtree(root, ignore_errors=True)
    secure = None
    if secure_for is not None:
        users = {name: secrets.token_urlsafe(18) for name in ("admin", *STAGE_NAMES)}
        secure = make_secure_kafka(root / "tls", users)
    kafka = start_kafka(settings, root / "kafka", secure=secure)
    try:
        redis_server = start_redis(root / "redis")
    except StackError:
        kafka.stop()
        raise
    servers = {s.name: {**s.__dict__, "log": str(s.log)} for s in (kafka, redis_server)}
    state.write_text(json.dumps({**servers, "secure": secure is not None}))
    ep = Endpoints(kafka.address, redis_server.address)
    if secure is not None and secure_for is not None:
        try:
            secure_stack(ep, secure, secure_for, root / "env")
        except Exception:
            stack_down(settings)
            raise
    return ep


STAGE_NAMES = ("scorer", "learner", "monitor")


def secure_stack(ep: Endpoints, secure: SecureKafka, spec_file: Path, envdir: Path) -> None:
    """What makes a started stack least-privilege for ``spec``: its topics (made as
    admin), each stage's Kafka ACLs (``riverflow.security.stage_acls``) and Redis user
    (``redis_acl_rules``), the Redis default user given the admin's password, and an
    env file per identity (``admin.env`` for the operator's CLI, ``<stage>.env``),
    readable by their owner only."""
    import redis
    from confluent_kafka.admin import AdminClient

    from riverflow.kafka_runtime import ensure_pipeline_topics
    from riverflow.security import redis_acl_rules, stage_acls
    from riverflow.spec import load_spec

    spec = load_spec(spec_file)
    admin_kafka = secure.client()
    ensure_pipeline_topics(ep.kafka_bootstrap, spec, Settings(), client=admin_kafka)
    admin = AdminClient({"bootstrap.servers": ep.kafka_bootstrap, **admin_kafka})
    bindings = [a for stage in STAGE_NAMES for a in stage_acls(spec, stage, f"User:{stage}")]
    for future in admin.create_acls(bindings).values():
        future.result()
    client = redis.Redis.from_url(ep.redis_url)
    for stage in STAGE_NAMES:
        rules = redis_acl_rules(spec, stage)
        client.execute_command("ACL", "SETUSER", stage, "on", f">{secure.users[stage]}", *rules)
    client.execute_command("ACL", "SETUSER", "default", "on", "resetpass",
                           f">{secure.users['admin']}")  # fmt: skip
    envdir.mkdir(parents=True, exist_ok=True)
    for name, password in secure.users.items():
        redis_user = "default" if name == "admin" else name
        lines = {
            "RIVERFLOW_KAFKA_BOOTSTRAP": ep.kafka_bootstrap,
            "RIVERFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "RIVERFLOW_KAFKA_SASL_USERNAME": name,
            "RIVERFLOW_KAFKA_SASL_PASSWORD": password,
            "RIVERFLOW_KAFKA_SSL_CA_FILE": str(secure.ca_file),
            "RIVERFLOW_REDIS_URL": ep.redis_url,
            "RIVERFLOW_REDIS_USERNAME": redis_user,
            "RIVERFLOW_REDIS_PASSWORD": password,
            "RIVERFLOW_SPEC": str(spec_file),
        }
        path = envdir / f"{name}.env"
        path.touch(mode=0o600)
        path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in lines.items()))


def stack_status(settings: Settings) -> list[ServerProcess]:
    """The servers ``stack up`` started (alive or not); empty if none. Each is found
    by the port it listens on, so a server restarted by hand on it is the one named."""
    state = _state_file(settings)
    if not state.exists():
        return []
    data = json.loads(state.read_text())
    return [
        ServerProcess(
            v["name"], v["pid"], v["address"], Path(v["log"]), v.get("durability", "")
        ).found()
        for v in data.values()
        if isinstance(v, dict)  # the servers (beside "secure")
    ]


def stack_down(settings: Settings) -> list[str]:
    """Stop what ``stack up`` started (or what runs on its ports now); returns the
    names stopped."""
    stopped = []
    for server in stack_status(settings):
        if server.alive():
            server.stop()
            stopped.append(server.name)
    _state_file(settings).unlink(missing_ok=True)
    return stopped


@dataclass
class RedisCluster:
    """A Redis Cluster on loopback that we started (``start_redis_cluster``): its
    nodes, each a ``redis-server --cluster-enabled yes`` with its own directory."""

    nodes: list[ServerProcess]
    workdir: Path
    node_timeout_ms: int
    password: str | None = None

    @property
    def url(self) -> str:
        """The URL a stage names it by (``redis+cluster://``: ``Settings.redis_url``)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def primaries(self) -> list[ServerProcess]:
        """The nodes that are primaries now (a failover changes which)."""
        import redis

        out = []
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                role = self.client(node).execute_command("ROLE")
            except redis.RedisError:
                continue
            if role[0] in (b"master", "master"):
                out.append(node)
        return out

    def restart(self, node: ServerProcess, timeout_s: float = 20.0) -> ServerProcess:
        """Start ``node`` again (after it stopped) on its port and directory: it
        reads its cluster config and rejoins, as a replica if it was failed over."""
        started = _start_cluster_node(
            self.workdir, node.port, self.node_timeout_ms, timeout_s, self.password
        )
        self.nodes[self.nodes.index(node)] = started
        return started

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Return once every running node says ``cluster_state:ok``."""

        def ok() -> None:
            for node in self.nodes:
                if node.alive():
                    info = self.client(node).cluster("INFO")
                    if info.get("cluster_state") != "ok":
                        raise StackError(f"node {node.port}: cluster not ok")

        _wait_ready("redis cluster", ok, timeout_s, None)

    def client(self, node: ServerProcess) -> Any:
        """A plain client of one node (not cluster-aware)."""
        import redis

        return redis.Redis(port=node.port, password=self.password, socket_timeout=2)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(5)


def _free_cluster_port() -> int:
    """A free loopback port P <= 55535 whose bus port P + 10000 is free too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise StackError("no free port pair (P, P + 10000) for a cluster node")


def _start_cluster_node(
    workdir: Path, port: int, node_timeout_ms: int, timeout_s: float, password: str | None
) -> ServerProcess:
    exe = shutil.which("redis-server")
    if exe is None:
        raise StackError("redis-server not found: install Debian's package (redis-server)")
    folder = workdir / str(port)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "redis.log"
    cmd = [
        exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
        *_REDIS_SETTINGS,
        "--cluster-enabled", "yes", "--cluster-config-file", str(folder / "nodes.conf"),
        "--cluster-node-timeout", str(node_timeout_ms), "--repl-diskless-sync-delay", "0",
        "--logfile", str(log),
    ]  # fmt: skip
    if password is not None:  # clients and the replicas of a node need it
        cmd += ["--requirepass", password, "--masterauth", password]
    pid = _spawn(cmd, folder / "redis.stdout", folder)
    auth = f":{password}@" if password is not None else ""
    server = ServerProcess("redis", pid, f"redis://127.0.0.1:{port}/0", log, REDIS_DURABILITY)
    url = f"redis://{auth}127.0.0.1:{port}/0"
    return _ready_or_stopped(server, lambda: wait_for_redis(url, timeout_s, server))


def start_redis_cluster(
    workdir: Path, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 2000,
    timeout_s: float = 30.0, password: str | None = None,
) -> RedisCluster:  # fmt: skip
    """Start a Redis Cluster on free loopback ports: ``primaries`` x (1 + ``replicas``)
    nodes (durable as ``start_redis``), joined by ``redis-cli --cluster create``;
    returns once every node says ``cluster_state:ok``. A node that stops for
    ``node_timeout_ms`` is failed over to its replica."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise StackError("redis-cli not found: install Debian's package (redis-tools)")
    cluster = RedisCluster([], workdir, node_timeout_ms, password)
    try:
        for _ in range(primaries * (1 + replicas)):
            port = _free_cluster_port()
            cluster.nodes.append(_start_cluster_node(workdir, port, node_timeout_ms, 20, password))
        cmd = [
            cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in cluster.nodes],
            "--cluster-replicas", str(replicas), "--cluster-yes",
        ]  # fmt: skip
        if password is not None:
            cmd += ["--pass", password, "--no-auth-warning"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0:
            raise StackError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        cluster.wait_ok(timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster

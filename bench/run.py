#!/usr/bin/env python3
"""Benchmark idgate against a direct connection and pgbouncer, in one run, reported as ratios.

    cargo build --release && python3 bench/run.py [--seconds 5] [--rounds 3]

Everything runs on this machine (loopback only): a throw-away PostgreSQL cluster, the dev IdP,
idgate (release build), and pgbouncer (session pooling). Every client uses TLS; direct and
pgbouncer clients log in with SCRAM-SHA-256, idgate clients with an Entra-shaped access token as
the password (idgate logs in to PostgreSQL as the mapped user, trust over loopback). The targets
are interleaved in short slices and each figure is the median of the rounds, so drift on a shared
machine hits all of them alike. Also measured: idgate with query audit on for the pool.

Figures: pgbench -S with 8 clients (TPS), -S with 1 client (average latency, ms), and -S -C
(a new TLS connection and login per transaction, TPS).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDGATE = os.path.join(ROOT, "target", "release", "idgate")
TENANT = "00000000-0000-4000-8000-00000000c0de"
USER = "alice@contoso.example"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bindir():
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
    d = out.stdout.strip()
    if d and os.path.exists(os.path.join(d, "initdb")):
        return d
    return "/usr/lib/postgresql/15/bin"


def as_postgres(cmd, **kw):
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def pgbench(port, env, args, seconds):
    cmd = ["pgbench", "-h", "localhost", "-p", str(port), "-U", env["PGUSER"], "-n", "-T", str(seconds)] + args + ["bench"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(f"pgbench {args} on {port} failed: {out.stderr[-2000:]}")
    tps = lat = None
    for line in out.stdout.splitlines():
        if line.startswith("tps ="):
            tps = float(line.split()[2])
        if line.startswith("latency average ="):
            lat = float(line.split()[3])
    return tps, lat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    if not os.path.exists(IDGATE):
        sys.exit("build first: cargo build --release")
    for tool in ["pgbench", "pgbouncer"]:
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} is missing (apt-get install postgresql-contrib pgbouncer)")
    work = tempfile.mkdtemp(prefix="idgate-bench-")
    os.chmod(work, 0o755)
    procs = []
    try:
        # Certificates for PostgreSQL, pgbouncer and idgate.
        subprocess.run([IDGATE, "dev-certs", "--dir", work, "--name", "localhost", "--name", "127.0.0.1"],
                       check=True, capture_output=True)
        for f in os.listdir(work):
            os.chmod(os.path.join(work, f), 0o644)
        shutil.chown(os.path.join(work, "idgate-key.pem"), "postgres", "postgres") if os.geteuid() == 0 else None
        os.chmod(os.path.join(work, "idgate-key.pem"), 0o600)
        ca = os.path.join(work, "ca.pem")

        # PostgreSQL with TLS; SCRAM for the benchmark role, trust for idgate's mapped user.
        data = os.path.join(work, "data")
        os.mkdir(data)
        sock = os.path.join(work, "sock")
        os.mkdir(sock)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(sock, "postgres", "postgres")
        b = bindir()
        as_postgres([os.path.join(b, "initdb"), "-D", data, "-U", "postgres", "-A", "trust"])
        pg_port = free_port()
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(f"port = {pg_port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sock}'\n"
                    f"max_connections = 300\nssl = on\nssl_cert_file = '{work}/idgate.pem'\n"
                    f"ssl_key_file = '{work}/idgate-key.pem'\nfsync = off\nsynchronous_commit = off\n"
                    "password_encryption = 'scram-sha-256'\n")
        with open(os.path.join(data, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "host all bench 127.0.0.1/32 scram-sha-256\n"
                    "host all \"aad:alice@contoso.example\" 127.0.0.1/32 trust\n"
                    "host all postgres 127.0.0.1/32 trust\n")
        as_postgres([os.path.join(b, "pg_ctl"), "-D", data, "-l", os.path.join(data, "pg.log"), "-w", "start"])
        psql = ["psql", "-h", sock, "-p", str(pg_port), "-U", "postgres", "-q", "-v", "ON_ERROR_STOP=1"]
        subprocess.run(psql + ["-c", "CREATE DATABASE bench"], check=True)
        subprocess.run(psql + ["-c", "CREATE ROLE bench LOGIN PASSWORD 'bench'; "
                                     "CREATE ROLE \"aad:alice@contoso.example\" LOGIN"], check=True)
        subprocess.run(["pgbench", "-h", sock, "-p", str(pg_port), "-U", "postgres", "-i", "-q", "-s", "10", "bench"],
                       check=True, capture_output=True)
        subprocess.run(psql + ["-d", "bench", "-c", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO bench, "
                               "\"aad:alice@contoso.example\""], check=True)

        # pgbouncer in session mode with TLS and SCRAM towards clients.
        pgb_port = free_port()
        with open(os.path.join(work, "userlist.txt"), "w") as f:
            f.write('"bench" "bench"\n')
        with open(os.path.join(work, "pgbouncer.ini"), "w") as f:
            f.write(f"[databases]\nbench = host=127.0.0.1 port={pg_port} dbname=bench\n"
                    f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {pgb_port}\n"
                    f"auth_type = scram-sha-256\nauth_file = {work}/userlist.txt\npool_mode = session\n"
                    f"max_client_conn = 500\ndefault_pool_size = 50\nclient_tls_sslmode = require\n"
                    f"client_tls_cert_file = {work}/idgate.pem\nclient_tls_key_file = {work}/idgate-key.pem\n"
                    f"server_tls_sslmode = disable\nunix_socket_dir =\n")
        for f in ["userlist.txt", "pgbouncer.ini"]:
            if os.geteuid() == 0:
                shutil.chown(os.path.join(work, f), "postgres", "postgres")
        pgb_cmd = ["pgbouncer", os.path.join(work, "pgbouncer.ini")]
        if os.geteuid() == 0:
            pgb_cmd = ["runuser", "-u", "postgres", "--"] + pgb_cmd
        procs.append(subprocess.Popen(pgb_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        # The dev IdP and a token for alice.
        idp_port = free_port()
        procs.append(subprocess.Popen([IDGATE, "dev-idp", "--addr", f"127.0.0.1:{idp_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(idp_port)
        form = urllib.parse.urlencode({"grant_type": "password", "client_id": "bench", "username": USER,
                                       "password": "dev", "scope": "api://idgate/jdbc_login"}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{idp_port}/{TENANT}/oauth2/v2.0/token", form) as r:
            token = json.load(r)["access_token"]

        # idgate twice: plain, and with query audit on.
        def start_idgate(name, query_audit):
            port = free_port()
            cfg = os.path.join(work, f"{name}.toml")
            with open(cfg, "w") as f:
                f.write(f"""
[listener]
addr = "127.0.0.1:{port}"
tls_cert_file = "{work}/idgate.pem"
tls_key_file = "{work}/idgate-key.pem"
max_connections = 1000
[[issuers]]
authority = "http://127.0.0.1:{idp_port}"
tenants = ["{TENANT}"]
audiences = ["api://idgate", "00000000-0000-4000-8000-0000000a99e5"]
required_scopes = ["jdbc_login"]
[[pools]]
name = "main"
targets = [{{ addr = "127.0.0.1:{pg_port}" }}]
[audit]
spool_dir = "{work}/{name}-spool"
query_audit_pools = [{'"main"' if query_audit else ''}]
[telemetry]
log_level = "warn"
""")
            procs.append(subprocess.Popen([IDGATE, "serve", "--config", cfg],
                                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{name}.log"), "w")))
            wait_port(port)
            return port

        targets = {
            "direct": (pg_port, {"PGUSER": "bench", "PGPASSWORD": "bench", "PGSSLMODE": "require"}),
            "pgbouncer": (pgb_port, {"PGUSER": "bench", "PGPASSWORD": "bench", "PGSSLMODE": "require"}),
            "idgate": (start_idgate("idgate", False), {"PGUSER": USER, "PGPASSWORD": token, "PGSSLMODE": "require"}),
            "idgate+query_audit": (start_idgate("idgate-qa", True),
                                   {"PGUSER": USER, "PGPASSWORD": token, "PGSSLMODE": "require"}),
        }
        wait_port(pgb_port)
        figures = {
            "select_8_clients_tps": (["-S", "-c", "8", "-j", "2"], 0),
            "select_1_client_latency_ms": (["-S", "-c", "1"], 1),
            "connect_per_txn_8_clients_tps": (["-S", "-C", "-c", "8", "-j", "2"], 0),
        }
        results = {f: {t: [] for t in targets} for f in figures}
        for rnd in range(args.rounds):
            for fig, (fargs, idx) in figures.items():
                for name, (port, env) in targets.items():
                    value = pgbench(port, env, fargs, args.seconds)[idx]
                    results[fig][name].append(value)
                    print(f"round {rnd + 1} {fig:32s} {name:20s} {value:10.3f}", flush=True)
        summary = {}
        print()
        print(f"medians of {args.rounds} rounds, {args.seconds}s slices, 2-core machine:")
        for fig in figures:
            med = {t: statistics.median(v) for t, v in results[fig].items()}
            summary[fig] = med
            line = ", ".join(f"{t} {v:.3f}" for t, v in med.items())
            better_is_lower = fig.endswith("latency_ms")
            ratio_d = med["idgate"] / med["direct"]
            ratio_p = med["idgate"] / med["pgbouncer"]
            qa = med["idgate+query_audit"] / med["idgate"]
            print(f"{fig}: {line}")
            print(f"  idgate/direct = {ratio_d:.2f}, idgate/pgbouncer = {ratio_p:.2f}, "
                  f"query_audit/plain = {qa:.2f} ({'lower' if better_is_lower else 'higher'} is better)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        data = os.path.join(work, "data")
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            try:
                as_postgres([os.path.join(bindir(), "pg_ctl"), "-D", data, "-m", "immediate", "stop"])
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

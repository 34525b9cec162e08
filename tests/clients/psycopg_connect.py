#!/usr/bin/env python3
"""Connect to idgate with psycopg 3 (libpq), sending the access token as the password, run one
query and print the rows as JSON on stdout (one JSON array of rows; each row is an array).

The token is read from --token-file, never from argv, so it does not show in `ps`; it is passed
to libpq as the `password=` connection parameter (cleartext password exchange, code 3).
TLS: --sslmode verify-full (default) or verify-ca with --sslrootcert=<gateway CA>; --sslmode
disable/prefer/require are accepted for local checks.

Exit codes: 0 success, 1 connection or query error (error text on stderr, with the token
redacted), 2 bad arguments.
"""

import argparse
import json
import os
import sys

EXIT_DRIVER_ERROR = 1
EXIT_USAGE = 2


def env_default(name, fallback=None):
    value = os.environ.get(name)
    return value if value else fallback


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Connect with psycopg 3 (token as password) and print query rows as JSON.",
        epilog="Environment defaults: IDGATE_HOST, IDGATE_PORT, IDGATE_DATABASE, IDGATE_USER, "
        "IDGATE_TOKEN_FILE, IDGATE_CA_FILE.",
    )
    p.add_argument("--host", default=env_default("IDGATE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env_default("IDGATE_PORT", "5439")))
    p.add_argument("--database", default=env_default("IDGATE_DATABASE", "dev"))
    p.add_argument("--user", default=env_default("IDGATE_USER"), required=False)
    p.add_argument(
        "--token-file",
        default=env_default("IDGATE_TOKEN_FILE"),
        help="file holding the access token (surrounding whitespace is stripped)",
    )
    p.add_argument(
        "--sslmode",
        choices=["verify-full", "verify-ca", "require", "prefer", "disable"],
        default="verify-full",
    )
    p.add_argument(
        "--sslrootcert",
        default=env_default("IDGATE_CA_FILE"),
        help="PEM CA bundle to trust (required for verify-ca / verify-full)",
    )
    p.add_argument("--application-name", default=None)
    p.add_argument("--connect-timeout", type=int, default=30)
    p.add_argument("--query", default="SELECT 1")
    return p.parse_args(argv)


def read_token(path):
    if not path:
        raise ValueError("--token-file (or IDGATE_TOKEN_FILE) is required")
    with open(path, "r", encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError("token file {} is empty".format(path))
    return token


def redact(text, secret):
    if secret:
        text = text.replace(secret, "<redacted token>")
    return text


def to_jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def main(argv):
    args = parse_args(argv)
    try:
        token = read_token(args.token_file)
    except (OSError, ValueError) as e:
        print("psycopg_connect: {}".format(e), file=sys.stderr)
        return EXIT_USAGE
    if not args.user:
        print("psycopg_connect: --user (or IDGATE_USER) is required", file=sys.stderr)
        return EXIT_USAGE
    if args.sslmode in ("verify-ca", "verify-full") and not args.sslrootcert:
        print(
            "psycopg_connect: --sslrootcert is required for sslmode {}".format(args.sslmode),
            file=sys.stderr,
        )
        return EXIT_USAGE

    import psycopg  # imported late so --help works without the package

    kwargs = {
        "host": args.host,
        "port": args.port,
        "dbname": args.database,
        "user": args.user,
        "password": token,
        "sslmode": args.sslmode,
        "connect_timeout": args.connect_timeout,
        "autocommit": True,
    }
    if args.sslrootcert:
        kwargs["sslrootcert"] = args.sslrootcert
    if args.application_name:
        kwargs["application_name"] = args.application_name

    try:
        with psycopg.connect(**kwargs) as conn:
            with conn.cursor() as cur:
                cur.execute(args.query)
                rows = cur.fetchall() if cur.description is not None else []
        out = [[to_jsonable(v) for v in row] for row in rows]
    except Exception as e:
        msg = "{}: {}".format(type(e).__name__, e)
        print("psycopg_connect: " + redact(msg, token).rstrip(), file=sys.stderr)
        return EXIT_DRIVER_ERROR
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

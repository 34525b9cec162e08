#!/usr/bin/env python3
"""Connect to idgate with the Amazon Redshift Python driver (redshift_connector 2.2.0), run one
query and print the rows as JSON on stdout (one JSON array of rows; each row is an array).

Modes (see docs/redshift-wire.md §5, §7):
  idp_token  credentials_provider="IdpTokenAuthPlugin", token=<token>, token_type="EXT_JWT"
             (native IdP path: idp_type=AwsIdc, AuthenticationRequest 14, 'i' message)
  basic_jwt  credentials_provider="BasicJwtCredentialsProvider", web_identity_token=<token>
             (native IdP path: idp_type=AzureAD)
  password   user=<--user>, password=<token>  (cleartext password exchange, code 3)

The token is read from --token-file, never from argv, so it does not show in `ps`.
redshift_connector has no sslrootcert option: the gateway CA is trusted through SSL_CERT_FILE
(--ca-file sets it for this process), which OpenSSL reads in load_default_certs().

Exit codes: 0 success, 1 connection or query error (driver error text on stderr, with the
token redacted), 2 bad arguments.
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
        description="Connect with redshift_connector and print query rows as JSON.",
        epilog="Environment defaults: IDGATE_HOST, IDGATE_PORT, IDGATE_DATABASE, IDGATE_TOKEN_FILE, "
        "IDGATE_CA_FILE.",
    )
    p.add_argument("--host", default=env_default("IDGATE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env_default("IDGATE_PORT", "5439")))
    p.add_argument("--database", default=env_default("IDGATE_DATABASE", "dev"))
    p.add_argument(
        "--mode", choices=["idp_token", "basic_jwt", "password"], default="idp_token"
    )
    p.add_argument(
        "--token-file",
        default=env_default("IDGATE_TOKEN_FILE"),
        help="file holding the access token (surrounding whitespace is stripped)",
    )
    p.add_argument(
        "--user",
        default=env_default("IDGATE_USER"),
        help="database user; required for --mode password, optional otherwise",
    )
    p.add_argument(
        "--sslmode",
        choices=["verify-ca", "verify-full", "default", "disable"],
        default="verify-ca",
        help="verify-ca / verify-full: passed explicitly; default: sslmode not passed (driver "
        "default verify-full, hostname mismatch only warns); disable: ssl=False (password mode "
        "only, the driver refuses it for IdP plugins)",
    )
    p.add_argument(
        "--ca-file",
        default=env_default("IDGATE_CA_FILE"),
        help="PEM CA bundle to trust; exported as SSL_CERT_FILE for this process",
    )
    p.add_argument("--token-type", default="EXT_JWT", help="token_type for idp_token mode")
    p.add_argument("--identity-namespace", default=None)
    p.add_argument("--provider-name", default=None)
    p.add_argument("--application-name", default=None)
    p.add_argument("--timeout", type=int, default=30, help="socket timeout in seconds")
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
        print("rs_connect: {}".format(e), file=sys.stderr)
        return EXIT_USAGE
    if args.mode == "password" and not args.user:
        print("rs_connect: --user is required for --mode password", file=sys.stderr)
        return EXIT_USAGE
    if args.sslmode == "disable" and args.mode != "password":
        print("rs_connect: --sslmode disable only works with --mode password", file=sys.stderr)
        return EXIT_USAGE
    if args.ca_file:
        # Must be set before the driver builds its SSLContext (load_default_certs()).
        os.environ["SSL_CERT_FILE"] = args.ca_file

    import redshift_connector  # imported late so --help works without the package

    kwargs = {
        "host": args.host,
        "port": args.port,
        "database": args.database,
        "timeout": args.timeout,
    }
    if args.application_name:
        kwargs["application_name"] = args.application_name
    if args.sslmode == "disable":
        kwargs["ssl"] = False
    else:
        kwargs["ssl"] = True
        if args.sslmode != "default":
            kwargs["sslmode"] = args.sslmode
    if args.mode == "idp_token":
        kwargs["credentials_provider"] = "IdpTokenAuthPlugin"
        kwargs["token"] = token
        kwargs["token_type"] = args.token_type
    elif args.mode == "basic_jwt":
        kwargs["credentials_provider"] = "BasicJwtCredentialsProvider"
        kwargs["web_identity_token"] = token
    else:
        kwargs["password"] = token
    if args.user:
        kwargs["user"] = args.user
    if args.identity_namespace:
        kwargs["identity_namespace"] = args.identity_namespace
    if args.provider_name:
        kwargs["provider_name"] = args.provider_name

    conn = None
    try:
        conn = redshift_connector.connect(**kwargs)
        cur = conn.cursor()
        cur.execute(args.query)
        rows = cur.fetchall() if cur.description is not None else []
        out = [[to_jsonable(v) for v in row] for row in rows]
        conn.commit()
    except Exception as e:  # the driver raises many types; report all the same way
        msg = "{}: {}".format(type(e).__name__, e)
        print("rs_connect: " + redact(msg, token), file=sys.stderr)
        return EXIT_DRIVER_ERROR
    finally:
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

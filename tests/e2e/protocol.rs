//! Wire-level behaviour: encryption negotiation, packet limits, split writes, protocol options,
//! cancel, timeouts, the connection cap and target failover.

use std::time::{Duration, Instant};

use idgate::devidp::TokenSpec;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    harness::{sqlstate, Env, EnvOptions, ALICE},
    raw::*,
};

#[tokio::test]
async fn plaintext_startup_is_refused_with_a_clear_error() {
    let env = Env::start().await;
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(&startup(&[("user", ALICE), ("database", "dev")], 0))
        .await
        .unwrap();
    let (tag, body) = read_msg(&mut tcp).await.unwrap();
    assert_eq!(tag, b'E');
    assert_eq!(error_code(&body), "28000");
    assert!(
        error_message(&body).contains("sslmode=require"),
        "{}",
        error_message(&body)
    );
    assert!(read_msg(&mut tcp).await.is_none(), "connection must close");
    let reason = env.wait_refusal_reason(0).await;
    assert_eq!(reason, "tls_required");
}

#[tokio::test]
async fn gssenc_is_declined_then_ssl_and_login_work_with_a_token_split_into_tiny_writes() {
    let env = Env::start().await;
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(&GSSENC_REQUEST).await.unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'N');
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(env.client_tls(false))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(&startup(&[("user", ALICE), ("database", "dev")], 0))
        .await
        .unwrap();
    let (tag, body) = read_msg(&mut tls).await.unwrap();
    assert_eq!((tag, auth_code(&body)), (b'R', 3));
    // A token close to 64 KiB, sent a few bytes per TLS record.
    let padding = "x".repeat(48_000);
    let token = env
        .idp
        .mint(&TokenSpec::user(ALICE).claim("padding", padding));
    assert!(
        token.len() > 64_000 && token.len() <= 65_536,
        "token is {} bytes",
        token.len()
    );
    let mut body = token.into_bytes();
    body.push(0);
    let msg = message(b'p', &body);
    for chunk in msg.chunks(997) {
        tls.write_all(chunk).await.unwrap();
        tls.flush().await.unwrap();
    }
    // Python's driver sends a Flush right after the password.
    tls.write_all(&message(b'H', &[])).await.unwrap();
    let msgs = read_until_ready(&mut tls).await;
    let tags: Vec<char> = msgs.iter().map(|(t, _)| *t as char).collect();
    assert_eq!(
        msgs.first().map(|(t, b)| (*t, auth_code(b))),
        Some((b'R', 0)),
        "{tags:?}"
    );
    assert!(tags.contains(&'K') && tags.last() == Some(&'Z'), "{tags:?}");
    // server_version is plain numeric for drivers that parse it.
    let version = msgs
        .iter()
        .filter(|(t, _)| *t == b'S')
        .map(|(_, b)| {
            b.split(|c| *c == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>()
        })
        .find(|p| p[0] == "server_version")
        .unwrap();
    assert!(
        version[1].chars().all(|c| c.is_ascii_digit() || c == '.'),
        "{version:?}"
    );
    assert_eq!(
        simple_query(&mut tls, "SELECT current_user").await,
        ["aad:alice@contoso.example"]
    );
}

#[tokio::test]
async fn redshift_native_idp_exchange_with_compression_option() {
    let env = Env::start().await;
    let mut tls = tls_connect(env.addr, env.client_tls(false)).await;
    let params = [
        ("user", ""),
        ("database", "dev"),
        ("client_protocol_version", "2"),
        ("driver_version", "Redshift JDBC Driver 2.2.6"),
        ("_pq_.compression", "lz4"),
        (
            "plugin_name",
            "com.amazon.redshift.plugin.IdpTokenAuthPlugin",
        ),
        ("idp_type", "AwsIdc"),
        ("token_type", "EXT_JWT"),
        ("identity_namespace", "aad"),
    ];
    tls.write_all(&startup(&params, 0)).await.unwrap();
    let mut z = [0u8; 6];
    tls.read_exact(&mut z).await.unwrap();
    assert_eq!(
        z,
        [0x7a, 0, 0, 0, 5, 0],
        "CompressionAck with an empty list"
    );
    let mut r = [0u8; 9];
    tls.read_exact(&mut r).await.unwrap();
    assert_eq!(
        r,
        [0x52, 0, 0, 0, 8, 0, 0, 0, 14],
        "AuthenticationRequest 14"
    );
    // 'i' with a trailing NUL (stripped by idgate).
    let mut token = env.token(ALICE).into_bytes();
    token.push(0);
    tls.write_all(&message(b'i', &token)).await.unwrap();
    let msgs = read_until_ready(&mut tls).await;
    assert_eq!(
        msgs.last().map(|m| m.0),
        Some(b'Z'),
        "{:?}",
        msgs.iter().map(|m| m.0 as char).collect::<Vec<_>>()
    );
    assert_eq!(
        simple_query(&mut tls, "SELECT current_user").await,
        ["aad:alice@contoso.example"]
    );
}

#[tokio::test]
async fn newer_minor_version_and_unknown_protocol_options_are_negotiated_down() {
    let env = Env::start().await;
    let mut tls = tls_connect(env.addr, env.client_tls(false)).await;
    tls.write_all(&startup(
        &[
            ("user", ALICE),
            ("database", "dev"),
            ("_pq_.something", "x"),
        ],
        2,
    ))
    .await
    .unwrap();
    let (tag, body) = read_msg(&mut tls).await.unwrap();
    assert_eq!(tag, b'v');
    assert_eq!(
        &body[..4],
        &0i32.to_be_bytes(),
        "newest minor supported is 0"
    );
    assert_eq!(&body[4..8], &1i32.to_be_bytes());
    assert_eq!(&body[8..], b"_pq_.something\0");
    let (tag, body) = read_msg(&mut tls).await.unwrap();
    assert_eq!((tag, auth_code(&body)), (b'R', 3));
}

#[tokio::test]
async fn direct_tls_needs_alpn_postgresql() {
    let env = Env::start().await;
    let name = || rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // With ALPN: a PostgreSQL 17 `sslnegotiation=direct` client.
    let tcp = TcpStream::connect(env.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(env.client_tls(true))
        .connect(name(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    tls.write_all(&startup(&[("user", ALICE), ("database", "dev")], 0))
        .await
        .unwrap();
    let (tag, body) = read_msg(&mut tls).await.unwrap();
    assert_eq!((tag, auth_code(&body)), (b'R', 3));
    // Without ALPN: refused.
    let tcp = TcpStream::connect(env.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(env.client_tls(false))
        .connect(name(), tcp)
        .await
        .unwrap();
    tls.write_all(&startup(&[("user", ALICE)], 0))
        .await
        .unwrap();
    let (tag, body) = read_msg(&mut tls).await.unwrap();
    assert_eq!((tag, error_code(&body)), (b'E', "08P01".to_owned()));
}

#[tokio::test]
async fn bytes_pipelined_after_sslrequest_are_not_read_as_protocol() {
    let env = Env::start().await;
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    let mut buf = SSL_REQUEST.to_vec();
    buf.extend(startup(&[("user", ALICE), ("database", "dev")], 0));
    tcp.write_all(&buf).await.unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    // The injected startup is fed to the TLS handshake, which fails; nothing else is answered.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        !rest.contains(&b'R'),
        "the pipelined startup must not get an authentication request: {rest:?}"
    );
    let ended = env.wait_event(|e| e["kind"] == "session_ended").await;
    assert_eq!(ended["end_reason"], "tls_handshake_failed");
}

#[tokio::test]
async fn oversized_and_truncated_startup_packets() {
    let env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| c.listener.handshake_timeout = Duration::from_secs(1)),
        ..EnvOptions::default()
    })
    .await;
    // Oversized: length above 10000.
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(&20_000u32.to_be_bytes()).await.unwrap();
    tcp.write_all(&196_608u32.to_be_bytes()).await.unwrap();
    let (tag, body) = read_msg(&mut tcp).await.unwrap();
    assert_eq!((tag, error_code(&body)), (b'E', "08P01".to_owned()));
    // Below the minimum, and an HTTP request (its first four bytes read as a huge length): the
    // client is told what this port speaks.
    for first in [&b"\0\0\0\x02"[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"] {
        let mut tcp = TcpStream::connect(env.addr).await.unwrap();
        tcp.write_all(first).await.unwrap();
        let (tag, body) = read_msg(&mut tcp).await.unwrap();
        assert_eq!((tag, error_code(&body)), (b'E', "08P01".to_owned()));
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("speaks the PostgreSQL protocol"), "{text}");
        assert!(!text.contains("length -"), "no negative length: {text}");
    }
    // Truncated, then silence: closed by the handshake timeout.
    let started = Instant::now();
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 100, 0, 3, 0, 0, b'u'])
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Before closing, the stalled client is told why.
    assert_eq!(rest.first(), Some(&b'E'), "{rest:?}");
    assert!(String::from_utf8_lossy(&rest).contains("timed out waiting for the startup packet"));
    env.wait_event(|e| e["kind"] == "session_ended" && e["end_reason"] == "handshake_timeout")
        .await;
    // A complete startup, then silence: the client gets an ErrorResponse, not just EOF.
    let mut tls = tls_connect(env.addr, env.client_tls(false)).await;
    tls.write_all(&startup(&[("user", ALICE), ("database", "dev")], 0))
        .await
        .unwrap();
    let (tag, body) = read_msg(&mut tls).await.unwrap();
    assert_eq!((tag, auth_code(&body)), (b'R', 3));
    let (tag, body) = tokio::time::timeout(Duration::from_secs(10), read_msg(&mut tls))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((tag, error_code(&body)), (b'E', "08P01".to_owned()));
    assert!(
        error_message(&body).contains("timed out"),
        "{}",
        error_message(&body)
    );
    // Truncated, then the client closes.
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 100, 0, 3]).await.unwrap();
    tcp.shutdown().await.unwrap();
    env.wait_event(|e| e["kind"] == "session_ended" && e["end_reason"] == "client_disconnected")
        .await;
}

#[tokio::test]
async fn cancel_request_reaches_the_right_backend_through_idgates_key() {
    let env = Env::start().await;
    let client = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    let cancel = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let started = Instant::now();
        let result = client.simple_query("SELECT pg_sleep(30)").await;
        (result.err().map(|e| sqlstate(&e)), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*env.client_tls(false)).clone());
    cancel.cancel_query(tls).await.unwrap();
    let (code, elapsed) = tokio::time::timeout(Duration::from_secs(20), sleeper)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code.as_deref(), Some("57014"), "query_canceled");
    assert!(elapsed < Duration::from_secs(20));
    let forwarded = env.wait_event(|e| e["kind"] == "cancel_forwarded").await;
    assert!(forwarded["reason"].is_null(), "{forwarded}");
    // A made-up key is dropped silently: no cancel_forwarded for it.
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    let mut req = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    req.extend_from_slice(&7i32.to_be_bytes());
    req.extend_from_slice(&9i32.to_be_bytes());
    tcp.write_all(&req).await.unwrap();
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.audit_events()
            .iter()
            .filter(|e| e["kind"] == "cancel_forwarded")
            .count(),
        1
    );
}

#[tokio::test]
async fn backend_errors_during_login_reach_the_client_with_their_sqlstate() {
    let env = Env::start().await;
    let err = env
        .pg_connect_db(Some(ALICE), &env.token(ALICE), "no_such_db")
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "3D000", "{err}");
    let failed = env
        .wait_event(|e| e["kind"] == "backend_login_failed")
        .await;
    assert_eq!(failed["reason"], "backend_refused_3D000");
}

#[tokio::test]
async fn connection_cap_answers_53300() {
    let env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| c.listener.max_connections = 1),
        ..EnvOptions::default()
    })
    .await;
    let first = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .unwrap();
    let err = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "53300");
    // Connections past the cap that stall in their handshake hold the few over-cap handshake
    // slots; while they do, a further client is closed without a TLS handshake (no 53300).
    let mut stalled = Vec::new();
    for _ in 0..idgate::gateway::OVER_CAP_HANDSHAKES {
        stalled.push(TcpStream::connect(env.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = env
        .pg_connect(Some(ALICE), &env.token(ALICE))
        .await
        .err()
        .unwrap();
    assert!(err.as_db_error().is_none(), "closed without a 53300: {err}");
    // Once they go away, a client past the cap is told 53300 again.
    drop(stalled);
    let mut told = false;
    for _ in 0..50 {
        let err = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .err()
            .unwrap();
        if err.as_db_error().is_some() {
            assert_eq!(sqlstate(&err), "53300");
            told = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(told, "the over-cap handshake slots were not released");
    drop(first);
    // The slot frees up once the first session ends.
    let mut ok = false;
    for _ in 0..50 {
        if env.pg_connect(Some(ALICE), &env.token(ALICE)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok);
}

#[tokio::test]
async fn a_target_that_refuses_connections_is_skipped() {
    // A port with nothing listening, placed first in the pool.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let env = Env::with(EnvOptions {
        tweak: Box::new(move |c, _| {
            let live = c.pools[0].targets[0].clone();
            let mut dead_target = live.clone();
            dead_target.addr = dead.to_string();
            dead_target.port = dead.port();
            c.pools[0].targets = vec![dead_target, live];
        }),
        ..EnvOptions::default()
    })
    .await;
    for _ in 0..4 {
        let client = env
            .pg_connect(Some(ALICE), &env.token(ALICE))
            .await
            .unwrap();
        client.simple_query("SELECT 1").await.unwrap();
    }
    let skipped = env
        .wait_event(|e| e["kind"] == "backend_attempt_failed")
        .await;
    assert_eq!(skipped["reason"], "backend_connect_failed");
    assert!(!env
        .audit_events()
        .iter()
        .any(|e| e["kind"] == "backend_login_failed"));
}

/// A stand-in for a load balancer with PROXY protocol v2: every connection to it is forwarded to
/// `upstream` behind a header that names `client` as the source. Returns its port.
async fn proxy_v2_balancer(upstream: std::net::SocketAddr, client: std::net::SocketAddr) -> u16 {
    use ppp::v2;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut outbound = TcpStream::connect(upstream).await.unwrap();
                let header = v2::Builder::with_addresses(
                    v2::Version::Two | v2::Command::Proxy,
                    v2::Protocol::Stream,
                    (client, upstream),
                )
                .write_tlv(0xEA, b"\x01vpce-0123456789abcdef0")
                .unwrap()
                .build()
                .unwrap();
                outbound.write_all(&header).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn proxy_protocol_v2_gives_the_audit_trail_the_real_client_address() {
    use idgate::net::proxy::{ProxyMode, ProxySettings};
    let env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| {
            c.listener.proxy = ProxySettings {
                mode: ProxyMode::Required,
                trusted: vec!["127.0.0.0/8".parse().unwrap()],
            }
        }),
        ..EnvOptions::default()
    })
    .await;
    let real_client: std::net::SocketAddr = "203.0.113.7:40123".parse().unwrap();
    let lb = proxy_v2_balancer(env.addr, real_client).await;
    let client = env
        .pg_connect_port(lb, Some(ALICE), &env.token(ALICE), "dev")
        .await
        .unwrap();
    let rows = client.simple_query("SELECT current_user").await.unwrap();
    assert!(!rows.is_empty());
    let routed = env.wait_event(|e| e["kind"] == "session_routed").await;
    assert_eq!(routed["client_addr"], "203.0.113.7:40123");
    assert!(
        routed["proxied_by"]
            .as_str()
            .unwrap_or_default()
            .starts_with("127.0.0.1:"),
        "{routed}"
    );
    // Straight to the listener, bypassing the load balancer: refused, with a reason.
    // (libpq prints an ErrorResponse that answers its SSLRequest.)
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    let (tag, body) = read_msg(&mut tcp).await.unwrap();
    assert_eq!((tag, error_code(&body)), (b'E', "08P01".to_owned()));
    assert!(
        error_message(&body).contains("load balancer"),
        "{}",
        error_message(&body)
    );
    let refused = env
        .wait_event(|e| e["kind"] == "auth_failed" && e["reason"] == "proxy_header_missing")
        .await;
    assert!(refused["proxied_by"].is_null());
    // A malformed header is refused too, and the gateway keeps serving.
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x00")
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    let (tag, body) = read_msg(&mut tcp).await.unwrap();
    assert_eq!((tag, error_code(&body)), (b'E', "08P01".to_owned()));
    env.wait_event(|e| e["kind"] == "auth_failed" && e["reason"] == "proxy_header_malformed")
        .await;
    assert!(env
        .pg_connect_port(lb, Some(ALICE), &env.token(ALICE), "dev")
        .await
        .is_ok());
}

/// A valid token for [`ALICE`] exactly `len` bytes long. A `padding` claim sets the length;
/// base64 never produces 4k+1 characters, so when the payload alone cannot reach `len`, an
/// `x5t` header member (as Entra puts in v1 tokens) shifts the header's length instead.
fn token_of_len(env: &Env, len: usize) -> String {
    for x5t in ["", "a", "ab", "abc"] {
        let spec = |pad: usize| {
            let spec = TokenSpec::user(ALICE).claim("padding", "x".repeat(pad));
            if x5t.is_empty() {
                spec
            } else {
                spec.header("x5t", x5t)
            }
        };
        let base = env.idp.mint(&spec(0)).len();
        // 3 bytes of JSON are 4 characters of base64.
        let guess = len.saturating_sub(base) * 3 / 4;
        for pad in guess.saturating_sub(4)..guess + 4 {
            let token = env.idp.mint(&spec(pad));
            if token.len() == len {
                return token;
            }
        }
    }
    panic!("cannot mint a token of exactly {len} bytes");
}

/// The tags of `msgs`, for assertion messages.
fn tags(msgs: &[(u8, Vec<u8>)]) -> Vec<char> {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

/// Messages up to ReadyForQuery must be AuthenticationOk … BackendKeyData … ReadyForQuery.
fn assert_logged_in(msgs: &[(u8, Vec<u8>)]) {
    let tags = tags(msgs);
    assert_eq!(
        msgs.first().map(|(t, b)| (*t, auth_code(b))),
        Some((b'R', 0)),
        "{tags:?}: {}",
        msgs.iter()
            .find(|(t, _)| *t == b'E')
            .map(|(_, b)| error_message(b))
            .unwrap_or_default()
    );
    assert!(tags.contains(&'K') && tags.last() == Some(&'Z'), "{tags:?}");
}

/// After the token: the login completes, the session runs queries as alice, and the audit
/// trail records the carriage (`auth_method`).
async fn assert_alice_session<S: AsyncRead + AsyncWrite + Unpin>(
    env: &Env,
    tls: &mut S,
    auth_method: &str,
) {
    let msgs = read_until_ready(tls).await;
    assert_logged_in(&msgs);
    assert_eq!(simple_query(tls, "SELECT 1").await, ["1"]);
    assert_eq!(
        simple_query(tls, "SELECT current_user").await,
        ["aad:alice@contoso.example"]
    );
    let ok = env.wait_event(|e| e["kind"] == "auth_succeeded").await;
    assert_eq!(ok["auth_method"], auth_method);
}

#[tokio::test]
async fn a_token_of_exactly_64_kib_logs_in_as_password_with_writes_split_inside_the_header() {
    let env = Env::start().await;
    let token = token_of_len(&env, 65_536);
    assert_eq!(token.len(), 65_536);
    let mut tls = tls_connect(env.addr, env.client_tls(false)).await;
    tls.get_ref().0.set_nodelay(true).unwrap();
    tls.write_all(&startup(&[("user", ALICE), ("database", "dev")], 0))
        .await
        .unwrap();
    let (tag, body) = read_msg(&mut tls).await.unwrap();
    assert_eq!((tag, auth_code(&body)), (b'R', 3));
    let mut body = token.into_bytes();
    body.push(0);
    let msg = message(b'p', &body);
    assert_eq!(msg.len(), 1 + 4 + 65_537);
    // The tag alone, then three of the four length bytes, then the rest in 1,000-byte writes:
    // idgate's reads see the header in pieces.
    let (tag_byte, rest) = msg.split_at(1);
    let (length_part, rest) = rest.split_at(3);
    for piece in [tag_byte, length_part] {
        tls.write_all(piece).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for chunk in rest.chunks(1_000) {
        tls.write_all(chunk).await.unwrap();
        tls.flush().await.unwrap();
    }
    assert_alice_session(&env, &mut tls, "password").await;
}

#[tokio::test]
async fn a_token_of_exactly_64_kib_logs_in_through_the_redshift_native_idp_exchange() {
    let env = Env::start().await;
    let token = token_of_len(&env, 65_536);
    assert_eq!(token.len(), 65_536);
    let mut tls = tls_connect(env.addr, env.client_tls(false)).await;
    tls.write_all(&startup(
        &[
            ("user", ""),
            ("database", "dev"),
            ("client_protocol_version", "2"),
            ("driver_version", "Redshift Python Driver 2.2.0"),
            (
                "plugin_name",
                "redshift_connector.plugin.BrowserAzureOAuth2CredentialsProvider",
            ),
            ("idp_type", "AzureAD"),
        ],
        0,
    ))
    .await
    .unwrap();
    let (tag, body) = read_msg(&mut tls).await.unwrap();
    assert_eq!(
        (tag, auth_code(&body)),
        (b'R', 14),
        "AuthenticationRequest 14"
    );
    // 'i' with the token and a trailing NUL, in 4,096-byte writes.
    let mut body = token.into_bytes();
    body.push(0);
    for chunk in message(b'i', &body).chunks(4_096) {
        tls.write_all(chunk).await.unwrap();
        tls.flush().await.unwrap();
    }
    assert_alice_session(&env, &mut tls, "redshift_idp").await;
}

/// Startup parameters, the tag of the message that carries the token, and the auth code that
/// asks for it.
type Carriage<'a> = (&'a [(&'a str, &'a str)], u8, i32);

#[tokio::test]
async fn a_validly_signed_token_one_byte_over_64_kib_is_refused_on_both_carriages() {
    let env = Env::start().await;
    let token = token_of_len(&env, 65_537);
    assert_eq!(token.len(), 65_537);
    let carriages: [Carriage; 2] = [
        (&[("user", ALICE), ("database", "dev")], b'p', 3),
        (
            &[("user", ""), ("database", "dev"), ("idp_type", "AzureAD")],
            b'i',
            14,
        ),
    ];
    for (params, tag, code) in carriages {
        let since = env.audit_events().len();
        let mut tls = tls_connect(env.addr, env.client_tls(false)).await;
        tls.write_all(&startup(params, 0)).await.unwrap();
        let (t, body) = read_msg(&mut tls).await.unwrap();
        assert_eq!((t, auth_code(&body)), (b'R', code));
        let mut body = token.clone().into_bytes();
        body.push(0);
        tls.write_all(&message(tag, &body)).await.unwrap();
        tls.flush().await.unwrap();
        let msgs = read_until_ready(&mut tls).await;
        let (t, body) = msgs.last().unwrap();
        assert_eq!(
            (*t, error_code(body)),
            (b'E', "28000".to_owned()),
            "'{}': {:?}",
            tag as char,
            tags(&msgs)
        );
        assert!(
            !msgs.iter().any(|(t, b)| *t == b'R' && auth_code(b) == 0),
            "no AuthenticationOk"
        );
        assert_eq!(
            env.wait_refusal_reason(since).await,
            "token_too_large",
            "'{}'",
            tag as char
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_cancel_request_is_served_even_when_every_over_cap_slot_is_taken() {
    let env = Env::with(EnvOptions {
        tweak: Box::new(|c, _| c.listener.max_connections = 1),
        ..EnvOptions::default()
    })
    .await;
    // The one session allowed, logged in by hand to learn idgate's BackendKeyData.
    let mut tls = tls_connect(env.addr, env.client_tls(false)).await;
    tls.write_all(&startup(&[("user", ALICE), ("database", "dev")], 0))
        .await
        .unwrap();
    let (tag, body) = read_msg(&mut tls).await.unwrap();
    assert_eq!((tag, auth_code(&body)), (b'R', 3));
    let mut password = env.token(ALICE).into_bytes();
    password.push(0);
    tls.write_all(&message(b'p', &password)).await.unwrap();
    let msgs = read_until_ready(&mut tls).await;
    let key = msgs
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .map(|(_, body)| body.clone())
        .expect("BackendKeyData");
    let mut query = b"SELECT pg_sleep(30)".to_vec();
    query.push(0);
    tls.write_all(&message(b'Q', &query)).await.unwrap();
    // Every over-cap handshake slot held by a stalled connection.
    let mut stalled = Vec::new();
    for _ in 0..idgate::gateway::OVER_CAP_HANDSHAKES {
        stalled.push(TcpStream::connect(env.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A plaintext CancelRequest (as libpq and pgjdbc send it) still reaches the backend.
    let mut cancel = TcpStream::connect(env.addr).await.unwrap();
    let mut req = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    req.extend_from_slice(&key);
    cancel.write_all(&req).await.unwrap();
    let started = Instant::now();
    // RowDescription first, then the query's error.
    let error = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (tag, body) = read_msg(&mut tls).await.unwrap();
            if tag == b'E' {
                return body;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(error_code(&error), "57014");
    assert!(started.elapsed() < Duration::from_secs(20));
    let forwarded = env.wait_event(|e| e["kind"] == "cancel_forwarded").await;
    assert!(forwarded["reason"].is_null(), "{forwarded}");
    drop(stalled);
}

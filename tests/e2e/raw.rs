//! A raw protocol client for the cases no driver produces (split writes, bad packets, direct
//! TLS, compression options).

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
pub const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// A StartupMessage with protocol 3.`minor`.
pub fn startup(pairs: &[(&str, &str)], minor: u16) -> Vec<u8> {
    let mut body = ((3u32 << 16) | minor as u32).to_be_bytes().to_vec();
    for (k, v) in pairs {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A typed message.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Read one typed message (None on EOF).
pub async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    s.read_exact(&mut body).await.ok()?;
    Some((head[0], body))
}

/// The SQLSTATE (`C` field) of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> String {
    field(body, b'C')
}

/// The message (`M` field) of an ErrorResponse body.
pub fn error_message(body: &[u8]) -> String {
    field(body, b'M')
}

fn field(body: &[u8], tag: u8) -> String {
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        if t == tag {
            return String::from_utf8_lossy(&tail[..end]).into_owned();
        }
        rest = &tail[(end + 1).min(tail.len())..];
    }
    String::new()
}

/// SSLRequest + TLS handshake (SNI localhost).
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S');
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Read messages until ReadyForQuery or an ErrorResponse; returns all of them.
pub async fn read_until_ready<S: AsyncRead + Unpin>(s: &mut S) -> Vec<(u8, Vec<u8>)> {
    let mut all = Vec::new();
    while let Some((tag, body)) = read_msg(s).await {
        let done = tag == b'Z' || tag == b'E';
        all.push((tag, body));
        if done {
            break;
        }
    }
    all
}

/// Run a simple query and return the text of the first column of each row.
pub async fn simple_query<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, sql: &str) -> Vec<String> {
    let mut q = sql.as_bytes().to_vec();
    q.push(0);
    s.write_all(&message(b'Q', &q)).await.unwrap();
    s.flush().await.unwrap();
    let mut rows = Vec::new();
    while let Some((tag, body)) = read_msg(s).await {
        match tag {
            b'D' => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                rows.push(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
            }
            b'E' => panic!("query failed: {}", error_message(&body)),
            b'Z' => break,
            _ => {}
        }
    }
    rows
}

/// The authentication request code of an `R` message body.
pub fn auth_code(body: &[u8]) -> i32 {
    i32::from_be_bytes([body[0], body[1], body[2], body[3]])
}

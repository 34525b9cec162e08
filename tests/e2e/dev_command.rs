//! `idgate dev`, the README quickstart: its printed psql line returns rows, Ctrl-C cleans up,
//! and without PostgreSQL binaries it says what to do.

use std::{process::Stdio, time::Duration};

use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_prints_a_psql_line_that_returns_rows_and_cleans_up_on_ctrl_c() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args(["dev", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut psql_line = None;
    let mut work_dir = None;
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.trim_start().starts_with("config:") {
                work_dir = line
                    .split_whitespace()
                    .nth(1)
                    .map(|p| std::path::PathBuf::from(p).parent().unwrap().to_owned());
            }
            if line.starts_with("PGPASSWORD=") {
                psql_line = Some(line);
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("idgate dev printed no psql line");
    let psql_line = psql_line.expect("no line beginning with PGPASSWORD=");
    let work_dir = work_dir.expect("no config path printed");
    assert!(psql_line.contains("sslmode=verify-full"), "{psql_line}");
    let out = tokio::process::Command::new("bash")
        .args(["-c", &psql_line])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "printed psql line failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("aad:alice@contoso.example") && stdout.contains("(2 rows)"),
        "{stdout}"
    );

    // Ctrl-C stops everything and removes the temporary files and the cluster.
    let pid = child.id().unwrap() as i32;
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!work_dir.exists(), "{} was not removed", work_dir.display());
}

#[tokio::test]
async fn dev_without_postgres_binaries_points_to_docker_compose() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_idgate"))
        .args(["dev", "--pg-bindir", "/nonexistent/bin"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("docker compose") && stderr.contains("apt-get install postgresql"),
        "{stderr}"
    );
}

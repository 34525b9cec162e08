//! `idgate dev`, the README quickstart: its printed psql line returns rows, Ctrl-C cleans up,
//! and without PostgreSQL binaries it says what to do.

use std::{process::Stdio, time::Duration};

use tokio::io::{AsyncBufReadExt, BufReader};

/// Run a printed command line with bash (in `dir`), asserting whether it succeeds.
async fn shell(line: &str, dir: Option<&std::path::Path>, succeeds: bool) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.args(["-c", line]);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = cmd.output().await.unwrap();
    assert_eq!(
        out.status.success(),
        succeeds,
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

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
    let mut rs_line = None;
    let mut bob_line = None;
    let mut bob_psql = None;
    let mut work_dir = None;
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.trim_start().starts_with("config:") {
                work_dir = line
                    .split_whitespace()
                    .nth(1)
                    .map(|p| std::path::PathBuf::from(p).parent().unwrap().to_owned());
            }
            if line.starts_with("PGPASSWORD=") && line.contains("user=bob@") {
                bob_psql = Some(line);
                break;
            } else if line.starts_with("PGPASSWORD=") {
                psql_line = Some(line);
            } else if line.starts_with("SSL_CERT_FILE=") {
                rs_line = Some(line);
            } else if line.starts_with("curl ") {
                bob_line = Some(line);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("idgate dev printed no psql line");
    let psql_line = psql_line.expect("no line beginning with PGPASSWORD=");
    let work_dir = work_dir.expect("no config path printed");
    assert!(psql_line.contains("sslmode=verify-full"), "{psql_line}");
    let out = shell(&psql_line, None, true).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("aad:alice@contoso.example") && stdout.contains("(2 rows)"),
        "{stdout}"
    );

    // The printed redshift_connector line, with the test venv's python for `python3`.
    let rs_line = rs_line.expect("no redshift_connector line");
    match crate::harness::python() {
        Some(py) => {
            let line = rs_line.replace("python3 -c", &format!("{} -c", py.display()));
            let out = shell(&line, None, true).await;
            let rows = String::from_utf8_lossy(&out.stdout);
            assert!(rows.contains("hello from behind idgate"), "{rows}");
        }
        None => crate::harness::missing_tool("python venv with redshift_connector"),
    }

    // The printed curl line gets a token for bob from the dev IdP's token endpoint; the printed
    // psql line for bob logs in as him, whom PostgreSQL itself refuses SELECT on demo.
    shell(&bob_line.expect("no curl line for bob"), None, true).await;
    let bob_psql = bob_psql.expect("no psql line for bob");
    let out = shell(&bob_psql, None, false).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");

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

//! The shipped configuration files and `docker-compose.yml` stay consistent with the config
//! format: every config passes `idgate check-config`, and the compose file wires what the
//! config references.

use std::process::Command;

use crate::harness::repo_root;

fn idgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_idgate"))
}

#[test]
fn check_config_reports_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[listener]
addr = "0.0.0.0:99999"
handshake_timeout = "a while"
tls_cert_file = "missing.pem"
tls_key_file = "missing-key.pem"

[[issuers]]
authority = "http://login.example.com"
tenants = ["not-a-guid"]
audiences = []

[[pools]]
name = "a"
backend_auth = "password"
backend_password = "hunter2"
targets = []
"#,
    )
    .unwrap();
    let out = idgate().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for path in [
        "listener.addr",
        "listener.handshake_timeout",
        "listener.tls_cert_file",
        "listener.tls_key_file",
        "issuers[0].authority",
        "issuers[0].tenants[0]",
        "issuers[0].audiences",
        "pools[0].backend_password",
        "pools[0].backend_auth",
        "pools[0].targets",
    ] {
        assert!(
            stderr.contains(path),
            "check-config output lacks {path}:\n{stderr}"
        );
    }
}

/// Dev certificates for configs that reference /certs/...
fn certs() -> (tempfile::TempDir, Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let out = idgate()
        .args(["dev-certs", "--dir"])
        .arg(dir.path())
        .args(["--name", "localhost"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.pem", "idgate.pem", "idgate-key.pem"] {
        assert!(dir.path().join(f).exists(), "dev-certs did not write {f}");
    }
    let env = vec![
        (
            "IDGATE__LISTENER__TLS_CERT_FILE".to_owned(),
            dir.path().join("idgate.pem").display().to_string(),
        ),
        (
            "IDGATE__LISTENER__TLS_KEY_FILE".to_owned(),
            dir.path().join("idgate-key.pem").display().to_string(),
        ),
    ];
    (dir, env)
}

#[test]
fn shipped_configs_pass_check_config() {
    let (_certs, env) = certs();
    let (_dir2, example_env) = {
        // The example references certs/ next to it and a password variable.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("certs")).unwrap();
        for f in ["idgate.pem", "idgate-key.pem"] {
            std::fs::copy(
                std::path::Path::new(&env[if f == "idgate.pem" { 0 } else { 1 }].1),
                d.path().join("certs").join(f),
            )
            .unwrap();
        }
        std::fs::copy(
            std::path::Path::new(&env[0].1).with_file_name("ca.pem"),
            d.path().join("certs/backend-ca.pem"),
        )
        .unwrap();
        std::fs::copy(
            repo_root().join("config/example.toml"),
            d.path().join("example.toml"),
        )
        .unwrap();
        let ca = idgate()
            .args(["ca", "init", "--dir"])
            .arg(d.path().join("certs"))
            .output()
            .unwrap();
        assert!(
            ca.status.success(),
            "{}",
            String::from_utf8_lossy(&ca.stderr)
        );
        let vars = [
            "IDGATE_BACKEND_PASSWORD",
            "IDGATE_PROBE_PASSWORD",
            "IDGATE_ADMIN_TOKEN",
        ];
        let env: Vec<(String, String)> = vars
            .iter()
            .map(|v| (v.to_string(), "from-env".to_owned()))
            .collect();
        (d, env)
    };
    let out = idgate()
        .arg("check-config")
        .arg(_dir2.path().join("example.toml"))
        .envs(example_env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "config/example.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = idgate()
        .arg("check-config")
        .arg(repo_root().join("config/docker.toml"))
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "config/docker.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn docker_compose_wires_what_the_config_references() {
    let compose: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap(),
    )
    .unwrap();
    let services = compose["services"].as_mapping().unwrap();
    let names: Vec<String> = services
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let idgate_svc = &compose["services"]["idgate"];
    // The image build copies everything the crate compiles in (the audit schema is
    // `include_str!`'d from migrations/).
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    for dir in ["src", "migrations"] {
        assert!(
            dockerfile.contains(&format!("COPY {dir} ./{dir}")),
            "the Dockerfile does not copy {dir}/"
        );
    }
    // The config file the idgate service mounts exists and is the one checked above.
    let volumes: Vec<&str> = idgate_svc["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mount = volumes
        .iter()
        .find(|v| v.ends_with("/etc/idgate/idgate.toml:ro"))
        .expect("config mount");
    let host_path = mount.split(':').next().unwrap();
    assert!(repo_root().join(host_path).exists(), "{host_path} missing");
    let command: Vec<&str> = idgate_svc["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command, ["serve", "--config", "/etc/idgate/idgate.toml"]);
    // Every target and the issuer authority point at compose services; the published port matches.
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo_root().join(host_path)).unwrap()).unwrap();
    for pool in config["pools"].as_array().unwrap() {
        for t in pool["targets"].as_array().unwrap() {
            let host = t["addr"].as_str().unwrap().rsplit_once(':').unwrap().0;
            assert!(
                names.iter().any(|n| n == host),
                "target host {host} is not a compose service"
            );
            assert!(compose["services"][host]["image"]
                .as_str()
                .unwrap()
                .starts_with("postgres:"));
        }
    }
    let authority = config["issuers"][0]["authority"].as_str().unwrap();
    let idp_host = authority
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap();
    assert!(
        names.iter().any(|n| n == idp_host),
        "issuer host {idp_host} is not a compose service"
    );
    let idp_cmd: Vec<&str> = compose["services"][idp_host]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        idp_cmd.windows(2).any(|w| w == ["--public-url", authority]),
        "dev-idp must publish {authority}"
    );
    let listen_port = config["listener"]["addr"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1;
    let ports: Vec<&str> = idgate_svc["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        ports
            .iter()
            .any(|p| p.ends_with(&format!(":{listen_port}"))),
        "{ports:?}"
    );
    // Certificates the config references come from the certs volume.
    assert!(config["listener"]["tls_cert_file"]
        .as_str()
        .unwrap()
        .starts_with("/certs/"));
    assert!(volumes.iter().any(|v| v.starts_with("certs:/certs")));
    // The init script mounted into the workgroups exists.
    for name in &names {
        if let Some(vols) = compose["services"][name.as_str()]["volumes"].as_sequence() {
            for v in vols
                .iter()
                .filter_map(|v| v.as_str())
                .filter(|v| v.starts_with("./"))
            {
                let p = v.split(':').next().unwrap();
                assert!(repo_root().join(p).exists(), "{name} mounts missing {p}");
            }
        }
    }
    // The Dockerfile builds the binary the services run.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo build --release --locked --bin idgate"));
}

#[test]
fn dev_certs_never_overwrites_another_ca() {
    let (dir, _) = certs();
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    // All three present: kept, exit 0 (docker-compose runs it on every start).
    let again = idgate()
        .args(["dev-certs", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
    // Only a CA there (e.g. from `idgate ca init`): refused, the file untouched.
    std::fs::remove_file(dir.path().join("idgate.pem")).unwrap();
    let refused = idgate()
        .args(["dev-certs", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not overwriting"));
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
    // --force replaces them.
    let forced = idgate()
        .args(["dev-certs", "--force", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(forced.status.success());
    assert_ne!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
}

#[test]
fn check_config_prints_the_start_warnings_and_refuses_what_serve_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let base = r#"
[listener]
addr = "127.0.0.1:0"
allow_plaintext = true

[[issuers]]
authority = "http://127.0.0.1:1"
tenants = ["00000000-0000-4000-8000-00000000c0de"]
audiences = ["api://idgate"]
{issuer_extra}

[[pools]]
name = "main"
targets = [{ addr = "127.0.0.1:5432" }]
"#;
    let file = dir.path().join("c.toml");
    // Valid, with two things serve warns about: trust and no required scope or app role.
    std::fs::write(&file, base.replace("{issuer_extra}", "")).unwrap();
    let out = idgate().arg("check-config").arg(&file).output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: issuer") && stderr.contains("no required_scopes"),
        "{stderr}"
    );
    assert!(stderr.contains("backend_auth = \"trust\""), "{stderr}");
    // Settings the token validator refuses fail check-config too, each with its path.
    std::fs::write(
        &file,
        base.replace(
            "{issuer_extra}",
            "leeway = \"100years\"\nhttp_timeout = \"0s\"\njwks_max_stale = \"0s\"",
        ),
    )
    .unwrap();
    let out = idgate().arg("check-config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for path in [
        "issuers[0].leeway",
        "issuers[0].http_timeout",
        "issuers[0].jwks_max_stale",
    ] {
        assert!(stderr.contains(path), "{path} missing:\n{stderr}");
    }
}

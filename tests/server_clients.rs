//! Real clients from PyPI against the real binary: the openai SDK, hermes-agent and a
//! 32-client streaming load. The Python environment comes from scripts/python-env.sh.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Server;

const KEY: &str = "sk-client-test";

fn python() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "python-env.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn client_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Runs a client script (killed after 10 minutes); its output is shown and it must print
/// `marker`.
fn run_client(server: &Server, script: &str, args: &[&str], marker: &str) {
    let out = Command::new("timeout")
        .arg("600")
        .arg(python())
        .arg(client_script(script))
        .arg(format!("{}/v1", server.base))
        .arg(KEY)
        .args(args)
        .output()
        .expect("run python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains(marker),
        "{script} failed; server log:\n{}",
        server.log_text()
    );
    let log = server.log_text();
    assert!(
        !log.contains(" ERROR ") && !log.contains("panicked"),
        "{log}"
    );
}

#[test]
fn openai_sdk() {
    let s = Server::start(&["-c", "4096", "-np", "2", "--api-key", KEY]);
    run_client(&s, "openai_sdk.py", &[], "OPENAI SDK OK");
}

#[test]
fn hermes_agent_calls_a_tool() {
    // Hermes refuses endpoints under 64K tokens of context: serve SmolLM2 at 64K with turbo4.
    let s = Server::start(&[
        "-c",
        "65536",
        "-ctk",
        "turbo4",
        "-ctv",
        "turbo4",
        "--api-key",
        KEY,
    ]);
    let work = std::env::temp_dir().join(format!("dh-hermes-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    run_client(&s, "hermes_task.py", &[work.to_str().unwrap()], "HERMES OK");
}

#[test]
fn thirty_two_streaming_clients_on_four_slots() {
    let s = Server::start(&["-c", "4096", "-np", "4", "--queue", "12", "--api-key", KEY]);
    let pid = s.pid().to_string();
    run_client(&s, "load.py", &[&pid, "32"], "LOAD OK");
}

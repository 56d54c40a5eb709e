//! A node that cannot start says why in one line: on stderr, without a backtrace unless
//! `RUST_BACKTRACE` asks for one, and in the termination message file a supervisor reads.

use std::process::Command;

fn removed_member_volume() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("removed.json"), r#"{"id":5,"cluster_id":9,"index":12}"#)
        .expect("writing a tombstone");
    dir
}

fn start_on(dir: &std::path::Path, termination_log: &std::path::Path, backtrace: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_raftkv-node"))
        .args([
            "--client-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .arg("--termination-message-path")
        .arg(termination_log)
        .env("RUST_BACKTRACE", backtrace)
        .env("RUST_LOG", "off")
        .output()
        .expect("running raftkv-node")
}

#[test]
fn a_fatal_error_is_one_tagged_line_on_stderr_and_in_the_termination_message() {
    let volume = removed_member_volume();
    let log = volume.path().join("termination-log");
    let output = start_on(volume.path(), &log, "0");
    assert!(!output.status.success(), "the node refuses a removed member's volume");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, no backtrace: {stderr}");
    assert!(
        lines[0].starts_with("raftkv-node: fatal [removed_member member=5 cluster=9]: member 5 was removed"),
        "{stderr}"
    );
    let message = std::fs::read_to_string(&log).expect("the termination message was written");
    assert_eq!(message, lines[0], "the termination message is the same line");
}

#[test]
fn a_backtrace_is_printed_only_when_asked_for() {
    let volume = removed_member_volume();
    let log = volume.path().join("termination-log");
    let output = start_on(volume.path(), &log, "1");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.lines().count() > 1,
        "RUST_BACKTRACE=1 adds the backtrace: {stderr}"
    );
    let message = std::fs::read_to_string(&log).expect("the termination message was written");
    assert_eq!(
        message.lines().count(),
        1,
        "the termination message stays one line: {message}"
    );
}

#[test]
fn a_damaged_wal_is_named_once_with_its_file_and_offset() {
    let volume = tempfile::tempdir().expect("a temporary directory");
    let wal = volume.path().join("wal");
    std::fs::create_dir_all(&wal).expect("a WAL directory");
    let segment = wal.join("0000000000000001-0000000000000001.wal");
    std::fs::write(&segment, b"NOTAWAL!\x01\x00\x00\x00 and more").expect("a damaged segment");
    let log = volume.path().join("termination-log");
    let output = start_on(volume.path(), &log, "0");
    assert!(!output.status.success(), "the node refuses a damaged WAL");
    let message = std::fs::read_to_string(&log).expect("the termination message was written");
    assert!(message.starts_with("raftkv-node: fatal [wal_damaged]: "), "{message}");
    let named = segment.display().to_string();
    assert_eq!(message.matches(&named).count(), 1, "the file is named once: {message}");
    assert!(message.contains("at offset 0"), "{message}");
}

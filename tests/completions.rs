//! `--generate`: every binary's man page and shell completions, made from
//! its clap definitions, are what they claim (a roff page named after the
//! binary, completions a real bash loads and that offer the subcommands
//! and flags), and the flag stands alone.

mod common;

use std::process::Command;

use common::bin;

const BINARIES: [&str; 6] = ["consumer", "producer", "dashboard", "debug", "plot", "demo"];

fn generate(binary: &str, what: &str) -> String {
    let out = bin(binary).args(["--generate", what]).output().unwrap();
    assert!(
        out.status.success(),
        "{binary} --generate {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_binary_has_a_man_page_and_completions() {
    for binary in BINARIES {
        let man = generate(binary, "man");
        assert!(man.contains(&format!(".TH {binary} 1")), "{binary}: {man}");
        assert!(man.contains("\\-\\-log\\-format"), "{binary}");
        assert!(man.contains("\\-\\-help"), "{binary}");

        let bash = generate(binary, "complete-bash");
        // A real bash loads it and registers the binary's completion.
        let loaded = Command::new("bash")
            .arg("-c")
            .arg(format!("source /dev/stdin && complete -p {binary}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(bash.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        let registered = String::from_utf8_lossy(&loaded.stdout);
        assert!(
            loaded.status.success() && registered.contains(binary),
            "{binary}: bash did not load it: {registered}"
        );
        assert!(bash.contains("--log-format"), "{binary}");

        assert!(generate(binary, "complete-zsh").starts_with(&format!("#compdef {binary}")));
        assert!(generate(binary, "complete-fish").contains(&format!("complete -c {binary}")));
        assert!(generate(binary, "complete-elvish").contains(binary));
        assert!(generate(binary, "complete-powershell").contains(binary));
    }
    let consumer = generate("consumer", "complete-bash");
    for word in [
        "check",
        "inspect-state",
        "verify",
        "--wedged-after-secs",
        "--group",
    ] {
        assert!(
            consumer.contains(word),
            "{word} missing from consumer's completion"
        );
    }
    assert!(generate("producer", "complete-bash").contains("--keep-topic"));
}

#[test]
fn generate_stands_alone() {
    let out = bin("consumer")
        .args(["--generate", "man", "0", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = bin("consumer")
        .args(["--generate", "troff"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("complete-bash"));
}

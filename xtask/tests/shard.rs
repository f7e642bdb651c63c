//! Sharded reproduce: two shard processes plus a merge write the same `table1.md` as one
//! unsharded run, on two small synthetic categories with a seeded random backbone.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `tessera` debug binary beside this test (built by `cargo test --workspace`; built here
/// when the test runs alone).
fn tessera() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().unwrap().parent().unwrap();
    let bin = debug.join("tessera");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "tessera-cli", "--bin", "tessera"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(st.success(), "building the tessera binary");
    }
    assert!(bin.is_file(), "no tessera binary at {}", bin.display());
    bin
}

fn run(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xtask {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn two_shards_and_a_merge_give_the_unsharded_table() {
    let bin = tessera();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for (cat, seed) in [("alpha", "1"), ("beta", "2")] {
        let st = Command::new(&bin)
            .args([
                "--quiet",
                "data",
                "demo",
                "--size",
                "64",
                "--train",
                "10",
                "--test-good",
                "2",
            ])
            .args(["--test-defect", "1", "--seed", seed, "--out"])
            .arg(data.join(cat))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let common = |out: &Path| -> Vec<String> {
        [
            "reproduce",
            "--data",
            &s(&data),
            "--scorers",
            "padim",
            "--random-weights",
            "1",
            "--preprocess",
            "64x64",
            "--sbm-epochs",
            "1",
            "--gallery",
            "1",
            "--tessera",
            &s(&bin),
            "--out",
            &s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    // One run, and the same in two shard processes side by side.
    let whole = tmp.path().join("whole");
    let mut a0 = common(&tmp.path().join("s0"));
    a0.extend(["--shard".into(), "0/2".into()]);
    let mut a1 = common(&tmp.path().join("s1"));
    a1.extend(["--shard".into(), "1/2".into()]);
    let spawn = |v: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(&v)
            .output()
            .unwrap()
    };
    let (h0, h1) = (
        std::thread::spawn(move || spawn(a0)),
        std::thread::spawn(move || spawn(a1)),
    );
    // A cell may fail (the 1-epoch SBM gate); xtask then exits 1 but still writes its tables,
    // so compare what the runs wrote, not their exit codes.
    let (o0, o1) = (h0.join().unwrap(), h1.join().unwrap());
    let _ = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(common(&whole))
        .output()
        .unwrap();
    for (o, d) in [(&o0, "s0"), (&o1, "s1")] {
        assert!(
            tmp.path().join(d).join("run.json").is_file(),
            "{d}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Each shard ran one category.
    for (d, cat, other) in [("s0", "alpha", "beta"), ("s1", "beta", "alpha")] {
        assert!(tmp.path().join(d).join("cells").join(cat).is_dir(), "{d}");
        assert!(
            !tmp.path().join(d).join("cells").join(other).exists(),
            "{d}"
        );
    }
    let merged = tmp.path().join("merged");
    let shards = format!(
        "{},{}",
        s(&tmp.path().join("s0")),
        s(&tmp.path().join("s1"))
    );
    run(&[
        "reproduce",
        "--merge",
        &shards,
        "--out",
        &s(&merged),
        "--tessera",
        &s(&bin),
    ]);
    let t_whole = std::fs::read_to_string(whole.join("table1.md")).unwrap();
    let t_merged = std::fs::read_to_string(merged.join("table1.md")).unwrap();
    assert_eq!(t_whole, t_merged);
    assert!(t_whole.contains("alpha") && t_whole.contains("beta"));
    // Merging shards of different runs is refused.
    let mut rj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("s1/run.json")).unwrap())
            .unwrap();
    rj["sbm_epochs"] = "2".into();
    std::fs::write(tmp.path().join("s1/run.json"), rj.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "reproduce",
            "--merge",
            &shards,
            "--out",
            &s(&tmp.path().join("bad")),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("other settings"));
}

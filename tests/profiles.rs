//! Every fio profile in fio-profiles/ parses and runs briefly against a real daemon, taking
//! its target from $NBD_URI as documented (`NBD_URI=... fio fio-profiles/X.fio`).

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;

const PROFILES: [&str; 10] = [
    "prefill.fio",
    "randread-4k-qd32.fio",
    "randread-4k-qd1.fio",
    "randwrite-4k-qd32.fio",
    "randwrite-4k-qd1.fio",
    "seqread-1m-qd8.fio",
    "seqwrite-1m-qd8.fio",
    "mixed-70-30.fio",
    "randread-4k-4conn.fio",
    "verify.fio",
];

fn profile(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fio-profiles").join(name)
}

#[test]
fn every_profile_is_listed_here() {
    let mut found: Vec<String> =
        std::fs::read_dir(profile("")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).filter(|n| n.ends_with(".fio")).collect();
    found.sort();
    let mut want: Vec<String> = PROFILES.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(found, want);
    for p in PROFILES {
        let text = std::fs::read_to_string(profile(p)).unwrap();
        assert!(text.contains("ioengine=nbd"), "{p} does not use ioengine=nbd");
        assert!(text.contains("uri=${NBD_URI}"), "{p} does not take uri=${{NBD_URI}}");
    }
}

#[test]
fn profiles_run_briefly_against_raid5() {
    let dir = TestDir::new("profiles");
    let m = dir.members("m", 4);
    create(&["--level", "raid5", "--size", "180MiB"], &m);
    let d = Daemon::start(&dir, &m);
    assert!(d.size() >= 512 * MIB, "volume smaller than the profiles' default size");
    for p in PROFILES {
        let mut c = Command::new(tool("fio"));
        c.arg("--verify_state_save=0");
        c.env("NBD_URI", d.uri()).arg("--io_size=2m").arg("--output-format=json").arg(profile(p));
        let o = run(&mut c);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let ctx = format!("profile {p}\n{}\n{}", show(&o), d.context());
        assert!(o.status.success(), "{ctx}");
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(!err.contains("fail") && !err.contains("error") && !err.contains("verify"), "{ctx}");
        let v: serde_json::Value = serde_json::from_str(&out[out.find('{').expect(&ctx)..]).expect(&ctx);
        let jobs = v["jobs"].as_array().expect(&ctx);
        assert!(!jobs.is_empty(), "{ctx}");
        for j in jobs {
            assert_eq!(j["error"].as_i64(), Some(0), "{ctx}");
            let io = j["read"]["io_bytes"].as_u64().unwrap() + j["write"]["io_bytes"].as_u64().unwrap();
            assert!(io >= 2 * MIB, "job {} of {p} did only {io} bytes\n{ctx}", j["jobname"]);
        }
    }
    d.stop_ok();
    check_clean(&m);
}

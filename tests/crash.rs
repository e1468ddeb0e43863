//! Crash consistency through the write-intent bitmap: rounds of kill -9 during random writes;
//! every restart resyncs only the dirty regions, and afterwards every stripe is consistent.

mod common;

use common::admin::*;
use common::*;
use std::time::{Duration, Instant};

const ROUNDS: usize = 10;

fn crash_rounds(tag: &str, args: &[&str], n: usize) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let mut a = args.to_vec();
    // Large, sparse members: the writes touch a small window, so a resync must stay small.
    a.extend(["--size", "512MiB"]);
    create(&a, &m);
    for round in 0..ROUNDS {
        let (d, ctl) = start_admin(&dir, &m);
        let st = status(&ctl);
        let uri = d.uri();
        let mut load = BgFio::spawn(
            &dir,
            &fio_nbd(
                &uri,
                &["--rw=randwrite", "--bsrange=4k-128k", "--offset=200m", "--size=16m", "--iodepth=16", "--numjobs=2", "--time_based", "--runtime=60"],
            ),
        );
        // Kill once writes are really flowing (the members' write counters move).
        let writes = |v: &serde_json::Value| slots(v).iter().map(|s| s["writes"].as_u64().unwrap_or(0)).sum::<u64>();
        let before = writes(&st);
        let t = Instant::now();
        while writes(&status(&ctl)) < before + 200 {
            assert!(load.is_running(), "round {round}: fio ended before the kill");
            assert!(t.elapsed() < READY_TIMEOUT, "round {round}: the fio load never reached the daemon");
            std::thread::sleep(Duration::from_millis(20));
        }
        d.kill9();
        let _ = load.finish_any();

        // The restart resyncs what was dirty, and only that: a 16 MiB window of a large volume.
        let (d, ctl) = start_admin(&dir, &m);
        let intent = status(&ctl)["intent"].clone();
        let regions = intent["regions"].as_u64().unwrap();
        let resynced = intent["resync_regions"].as_u64().unwrap();
        assert!(resynced >= 1, "round {round}: a kill -9 under load left no dirty region to resync: {intent}");
        assert!(resynced * 8 <= regions, "round {round}: resync touched {resynced} of {regions} regions for a 16 MiB write window: {intent}");
        assert_eq!(intent["dirty_regions"].as_u64(), Some(0), "round {round}: regions still dirty once serving: {intent}");
        d.stop_ok();
        check_clean(&m);
    }
}

#[test]
fn kill9_rounds_raid5() {
    crash_rounds("crash-r5", &["--level", "raid5"], 4);
}

#[test]
fn kill9_rounds_ec_4_2() {
    crash_rounds("crash-ec", &["--level", "ec", "--data", "4", "--parity", "2"], 6);
}

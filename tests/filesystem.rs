//! A real ext4 filesystem on a raid5 volume, without the kernel nbd module:
//! nbdfuse + losetup + mkfs.ext4 + mount. Copy a tree of random files in, unmount, restart the
//! daemon (members in another order), mount again and compare every file.
//!
//! The same with deferred checksum pages, the daemon killed (-9) once the filesystem is
//! unmounted: what the unmount flushed must have taken its checksum pages with it, so the
//! restart has nothing to take on trust.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// Nested directories of random files, a few hundred KB to several MB each.
fn make_tree(root: &Path, seed: u64) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dirs = ["", "a", "a/b", "a/b/c", "d", "d/e", "f/g/h/i"];
    let mut total = 0;
    for (i, d) in dirs.iter().enumerate() {
        let dir = root.join(d);
        std::fs::create_dir_all(&dir).unwrap();
        for j in 0..4 {
            let len = match (i + j) % 4 {
                0 => rng.gen_range(200 * KIB..600 * KIB),
                1 => rng.gen_range(600 * KIB..2 * MIB),
                2 => rng.gen_range(2 * MIB..6 * MIB),
                _ => rng.gen_range(1..100 * KIB) + 1, // odd small sizes too
            };
            random_file(&dir.join(format!("file{j}.bin")), len, rng.gen());
            total += len;
        }
    }
    total
}

#[test]
fn ext4_on_raid5_survives_restart() {
    ext4_survives_restart("fs-raid5", &[], false);
}

#[test]
fn ext4_on_raid5_with_deferred_checksum_pages_survives_kill9_after_unmount() {
    ext4_survives_restart("fs-raid5-def", &["--checksum-pages", "deferred"], true);
}

fn ext4_survives_restart(tag: &str, extra: &[&str], kill_after_unmount: bool) {
    let dir = TestDir::new(tag);
    let members = dir.members("m", 4);
    let mut args = vec!["--level", "raid5", "--size", "160MiB", "--name", "fsvol"];
    args.extend(extra);
    create(&args, &members);

    let src = dir.join("src");
    let total = make_tree(&src, 42);
    assert!(total > 20 * MIB, "tree too small: {total}");
    let want = tree_hashes(&src);
    assert_eq!(want.len(), 28);

    let d = Daemon::start(&dir, &members);
    {
        let mv = MountedVolume::new(&dir, &d.sock, "1", true);
        copy_tree(&src, &mv.path().join("tree"));
        // read back while still mounted (mostly page cache, but catches copy mistakes)
        assert_eq!(tree_hashes(&mv.path().join("tree")), want);
        mv.unmount();
    }
    if kill_after_unmount {
        d.kill9();
    } else {
        d.stop_ok();
        check_clean(&members);
    }

    let (d, ctl) = common::admin::start_admin(&dir, &shuffled(&members, 3));
    let intent = common::admin::status(&ctl)["intent"].clone();
    assert_eq!(
        intent["resync_adopted"].as_u64(),
        Some(0),
        "{tag}: blocks taken on trust after the restart, although the unmount flushed everything: {intent}\n{}",
        d.context()
    );
    {
        let mv = MountedVolume::new(&dir, &d.sock, "2", false);
        let got = tree_hashes(&mv.path().join("tree"));
        assert_eq!(got.len(), want.len(), "file count differs after remount");
        for (p, h) in &want {
            assert_eq!(got.get(p), Some(h), "file {} differs after restart and remount", p.display());
        }
        // fsck-level consistency: the filesystem unmounts cleanly and e2fsck finds nothing
        let lo_dev = mv.lo.as_ref().unwrap().dev().to_string();
        let mnt = mv.path().to_path_buf();
        let mut mv = mv;
        mv.mount.take().unwrap().umount();
        assert!(!is_mounted(&mnt));
        let o = run(std::process::Command::new(tool("e2fsck")).args(["-f", "-n"]).arg(&lo_dev));
        assert!(o.status.success(), "e2fsck found problems after restart\n{}", show(&o));
        mv.lo.take().unwrap().detach();
        mv.fuse.take().unwrap().stop();
    }
    d.stop_ok();
    check_clean(&members);
}

//! Bit rot: damaged batches are never served, and the scrub repairs them from another
//! replica; without the scrub, the checker counts a damaged batch as lost.

fn config(scrub: bool) -> sim::Config {
    sim::Config {
        duration_ms: 600_000,
        bit_rot_every_ms: 5_000,
        scrub,
        ..sim::Config::default()
    }
}

#[test]
fn damaged_batches_are_repaired_and_nothing_damaged_is_served() {
    for seed in 1..=3 {
        let r = sim::run(seed, &config(true)).unwrap_or_else(|f| panic!("{f}"));
        // Some damaged batches are removed (truncated, wiped) before a repair; one left damaged
        // at the end would be a loss the checker reports.
        assert!(r.stats.rotted >= 20 && r.stats.repaired >= 20, "{r}");
    }
}

#[test]
fn without_the_scrub_the_checker_finds_the_damage() {
    let f = sim::run(1, &config(false)).expect_err("damage left in place is a loss");
    let all = f.violations.join("\n");
    assert!(
        all.contains("lost record") || all.contains("differs from its leader's"),
        "{all}"
    );
}

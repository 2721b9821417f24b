//! The conformance suite: cases written once over a [`Fixture`], expanded into one named test
//! per case per backend, and the real-server harness that starts etcd and ZooKeeper for them.
//!
//! Running the suite against a backend takes a fixture and one macro call in a test file:
//!
//! ```text
//! use std::sync::{Arc, OnceLock};
//! use conformance_tests::{conformance_suite, Fixture};
//!
//! fn fixture() -> Arc<dyn Fixture> {
//!     static FIXTURE: OnceLock<Arc<dyn Fixture>> = OnceLock::new();
//!     FIXTURE.get_or_init(|| Arc::new(MyFixture::start())).clone()
//! }
//!
//! conformance_suite!(fixture);
//! ```
//! Every case becomes a `#[tokio::test]` of the same name (the test crate needs `tokio`). A
//! case the backend cannot run (a capability it declares missing) passes and prints
//! `SKIPPED <backend>::<case>: <reason>`. Every result is also recorded for the run's summary:
//! `cargo run -p conformance-tests --bin conformance-report` prints a backend-by-case table and
//! writes `summary.json` and `junit.xml` (see [`report`]).
#![warn(missing_docs)]

pub mod cases;
pub mod faults;
pub mod fixture;
pub mod harness;
pub mod memory_fixture;
pub mod report;
pub mod support;

use std::time::Duration;

pub use fixture::{Fault, Fixture};
pub use memory_fixture::MemoryFixture;
pub use support::Outcome;

/// Longest a single case may run before it fails as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one case of the suite: bounded by [`CASE_TIMEOUT`], recorded for the run's summary
/// (see [`report`]), skips printed with their reason; a failure or hang fails the test.
pub async fn run_case<F>(backend: &str, case: &str, body: F)
where
    F: std::future::Future<Output = Outcome>,
{
    use futures::FutureExt;
    let started = std::time::Instant::now();
    let result = std::panic::AssertUnwindSafe(tokio::time::timeout(CASE_TIMEOUT, body))
        .catch_unwind()
        .await;
    let took = started.elapsed();
    match result {
        Ok(Ok(Outcome::Passed)) => report::record(backend, case, &report::Verdict::Passed, took),
        Ok(Ok(Outcome::Skipped(reason))) => {
            eprintln!("SKIPPED {backend}::{case}: {reason}");
            report::record(backend, case, &report::Verdict::Skipped(reason), took);
        }
        Ok(Err(_)) => {
            let why = format!("did not finish within {CASE_TIMEOUT:?}");
            report::record(backend, case, &report::Verdict::Failed(why.clone()), took);
            panic!("[{backend}::{case}] {why}");
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panicked".into());
            report::record(backend, case, &report::Verdict::Failed(why), took);
            std::panic::resume_unwind(panic);
        }
    }
}

/// Expands every case of the suite into a `#[tokio::test]` for the fixture returned by
/// `$fixture` (a `fn() -> Arc<dyn Fixture>`). The case list lives here, once.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:path) => {
        $crate::__conformance_cases!(
            $fixture;
            values_round_trip,
            paths_rejected,
            paths_at_character_edges_work,
            errors_are_typed,
            versions_count_writes,
            parents_created,
            recursive_delete_is_all_or_nothing,
            children_direct_and_ordered,
            sequential_concurrent_unique,
            sequential_never_overwrites,
            ephemeral_gone_after_close,
            session_expiry_removes_ephemerals_and_reestablishes,
            close_ends_streams,
            session_status_of_a_new_client,
            every_call_after_close_is_closed,
            watch_node_scope,
            watch_children_scope,
            watch_subtree_scope,
            watch_model_check,
            watch_from_revision,
            watch_deletions_only,
            watch_recursive_delete_children_first,
            watch_drop_releases,
            watch_outlives_its_client_handle,
            tree_cache_follows_writes,
            tree_cache_recovers_after_session_loss,
            persistent_watch_reads_every_source_anew,
            register_deregister_and_drop,
            delete_owned_spares_other_owners,
            set_owned_spares_other_owners,
            registration_recreated_after_expiry,
            registration_recreated_after_external_delete,
            registration_recreated_when_deleted_at_once,
            registration_replaces_stale_node,
            registration_set_value_survives_recreation,
            registrations_of_one_path_take_turns,
            close_stops_registrations,
            lock_mutual_exclusion,
            lock_no_herd,
            lock_cancelled_leaves_no_node,
            lock_lost_on_session_expiry,
            election_single_leader,
            election_leader_lost_on_session_expiry,
            recipes_skip_foreign_nodes,
            limits_path_and_depth_at_the_edge,
            operations_traced,
        );
        $crate::__conformance_fault_cases!(
            $fixture;
            fault_server_restart,
            fault_server_pause_over_ttl,
            fault_server_pause_short,
            fault_partition_over_ttl,
            fault_partition_short,
            fault_lock_holder_partitioned,
            fault_leader_kill,
            fault_member_pause,
            fault_leader_pause_short,
            fault_owner_crash,
            fault_compaction,
            fault_slow_consumer,
            watch_large_change_reaches_a_reading_consumer,
            fault_chaos,
            limits_many_children,
        );

        /// Not a test: the owner process `fault_owner_crash` starts by re-running this binary
        /// with `--ignored --exact` (see `faults::owner_process_main`). Ignored so a normal run
        /// does not list it as a passing test that asserts nothing.
        #[test]
        #[ignore = "entry point of fault_owner_crash's child process, not a test"]
        fn conformance_owner_process() {
            $crate::faults::owner_process_main($fixture);
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_fault_cases {
    ($fixture:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture: ::std::sync::Arc<dyn $crate::Fixture> = $fixture();
                // Alone: no other case of this binary runs meanwhile; the wait does not count
                // against the case's time.
                let _alone = $crate::faults::EXCLUSIVE.write().await;
                $crate::run_case(
                    fixture.name(),
                    stringify!($case),
                    $crate::cases::$case(&*fixture),
                )
                .await;
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($fixture:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture: ::std::sync::Arc<dyn $crate::Fixture> = $fixture();
                // Never beside a heavy case; the wait does not count against the case's time.
                let _shared = $crate::faults::EXCLUSIVE.read().await;
                $crate::run_case(
                    fixture.name(),
                    stringify!($case),
                    $crate::cases::$case(&*fixture),
                )
                .await;
            }
        )*
    };
}

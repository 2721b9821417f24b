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
//! `SKIPPED <backend>::<case>: <reason>`.
#![warn(missing_docs)]

pub mod cases;
pub mod fixture;
pub mod harness;
pub mod memory_fixture;
pub mod support;

use std::time::Duration;

pub use fixture::{Fault, Fixture};
pub use memory_fixture::MemoryFixture;
pub use support::Outcome;

/// Longest a single case may run before it fails as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// Reports a case's outcome the way every backend's test run prints it.
pub fn report(backend: &str, case: &str, outcome: Outcome) {
    if let Outcome::Skipped(reason) = outcome {
        eprintln!("SKIPPED {backend}::{case}: {reason}");
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
            errors_are_typed,
            versions_count_writes,
            parents_created,
            children_direct_and_ordered,
            sequential_concurrent_unique,
            ephemeral_gone_after_close,
            session_expiry_removes_ephemerals_and_reestablishes,
            close_ends_streams,
            watch_node_scope,
            watch_children_scope,
            watch_subtree_scope,
            watch_model_check,
            watch_from_revision,
            watch_drop_releases,
            register_deregister_and_drop,
            registration_recreated_after_expiry,
            registration_recreated_after_external_delete,
            registration_replaces_stale_node,
            registration_set_value_survives_recreation,
            lock_mutual_exclusion,
            lock_no_herd,
            lock_cancelled_leaves_no_node,
            lock_lost_on_session_expiry,
            election_single_leader,
            election_leader_lost_on_session_expiry,
        );
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
                let outcome = ::tokio::time::timeout(
                    $crate::CASE_TIMEOUT,
                    $crate::cases::$case(&*fixture),
                )
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "[{}::{}] did not finish within {:?}",
                        fixture.name(),
                        stringify!($case),
                        $crate::CASE_TIMEOUT
                    )
                });
                $crate::report(fixture.name(), stringify!($case), outcome);
            }
        )*
    };
}

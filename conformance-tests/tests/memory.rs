//! The whole conformance suite on the in-memory backend.

use std::sync::{Arc, OnceLock};

use conformance_tests::{conformance_suite, Fixture, MemoryFixture};

fn fixture() -> Arc<dyn Fixture> {
    static FIXTURE: OnceLock<Arc<dyn Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| Arc::new(MemoryFixture::new()))
        .clone()
}

conformance_suite!(fixture);

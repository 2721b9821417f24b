//! `ServiceView::select` keeps its documented promise: once warm, a random or consistent-hash
//! pick allocates nothing, also when routing rules read numeric and address IDs.
//!
//! Its own test binary: it installs a global allocator that counts allocations made on the
//! thread that asked for counting.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use registry_core::{Bytes, Expected, MemoryOptions, MemoryRegistry, MemoryStore, Registry};
use registry_soa::layout::ServicePaths;
use registry_soa::routes::CallContext;
use registry_soa::{Address, Provider, SelectOptions, ServiceView};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn count() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations_in(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

const SERVICE: &str = "test.AllocationService";

#[tokio::test(flavor = "current_thread")]
async fn warm_select_allocates_nothing_when_rules_read_numbers_and_addresses() {
    let store = MemoryStore::new();
    let registry: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let mut providers = Vec::new();
    for i in 1..=3u8 {
        let address = Address {
            ip: [10, 0, 0, i].into(),
            port: 9090,
        };
        providers.push(
            Provider::register(&registry, SERVICE, address, "1.0.0")
                .await
                .unwrap(),
        );
    }
    // The first rule is evaluated and fails, the second matches: both read formatted values.
    let rules = "userId match 7 => ip'10.0.0.3'\n\
                 userId match %'1024n+5' ; callerIp match ip'10.0.0.0/8' => ip'10.0.0.1', ip'10.0.0.2'";
    let routes = ServicePaths::new(SERVICE).unwrap().routes;
    registry
        .set(&routes, Bytes::from(rules), Expected::Any)
        .await
        .unwrap();
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    let mut changes = view.changes();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !(view.snapshot().instances.len() == 3 && view.snapshot().routes.len() == 2) {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the view never saw three instances and two rules");

    let call = CallContext {
        service: SERVICE.into(),
        method: "get".into(),
        version: "1.0.0".into(),
        user_id: Some(1029),
        caller_ip: Some([10, 1, 2, 3].into()),
        ..Default::default()
    };
    let random = SelectOptions::default();
    let hashed = SelectOptions {
        load_balance: Some(registry_soa::config::LoadBalance::ConsistentHash),
        hash_key: Some("user-1029".into()),
    };
    for options in [&random, &hashed] {
        // Warm up: the remembered compatible set and per-thread state are made once.
        let first = view.select(&call, options).unwrap();
        assert!(
            [1, 2].contains(&first.address.ip.octets()[3]),
            "routed to {}",
            first.address
        );
        let allocated = allocations_in(|| {
            for _ in 0..1000 {
                drop(std::hint::black_box(view.select(&call, options)));
            }
        });
        assert_eq!(allocated, 0, "{options:?}: 1000 warm selects allocated");
    }
    for p in providers {
        p.shutdown().await.unwrap();
    }
}

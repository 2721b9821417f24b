//! Load balancing over routed instances: weighted random, smooth weighted round robin (each
//! candidate set's rotation starts at a random point), least active, and consistent hash.
//!
//! Each consumer balances on its own, so Java and Rust consumers of one service need not pick
//! alike. One exception to know before writing `consistentHash` into a node Java consumers
//! read: Dapeng's client has no working consistent hash (its `loadBalance` leaves the case
//! empty), and its calls then fail with no instance found.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::config::LoadBalance;
use crate::layout::Address;

/// An instance offered to a balancer with its effective weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The instance.
    pub address: Address,
    /// Its weight (0 is never picked unless every weight is 0).
    pub weight: u32,
}

/// Per-service balancer state: round-robin positions per set of candidates, and in-flight
/// counts per address.
///
/// Guarantees: `pick` returns an index into the candidates, or `None` only for an empty list.
/// Round robin rotates each distinct candidate set (the same addresses and weights, in any
/// order) by weight on its own, however calls over different sets interleave; the
/// [`ROTATIONS`] most recently used sets keep their positions. Memory stays bounded under
/// instance churn: idle in-flight counters of any address are dropped as the map grows.
#[derive(Default)]
pub struct Balancer {
    round_robin: Mutex<Rotations>,
    active: Mutex<InFlight>,
}

/// How many candidate sets a balancer keeps round-robin positions for; a set beyond that
/// replaces the least recently used one, which starts over if it comes back.
pub const ROTATIONS: usize = 64;

/// Size below which the in-flight map is not pruned: pruning scans it, so it waits until the
/// map is large, and then until it has doubled again, to keep calls amortised O(1).
const ACTIVE_PRUNE_FLOOR: usize = 1024;

/// Round-robin state of every candidate set seen recently, keyed by a hash of the set.
#[derive(Default)]
struct Rotations {
    sets: HashMap<u64, Rotation>,
    /// Counts picks; a set's `used` is its value at the set's last pick.
    clock: u64,
}

/// Smooth weighted round robin over one candidate set.
struct Rotation {
    /// The set, sorted by address and weight; compared in full on lookup, so two sets whose
    /// hashes collide never share positions.
    members: Vec<Candidate>,
    /// Each member's current value.
    current: Vec<i64>,
    used: u64,
}

/// In-flight counters by address.
#[derive(Default)]
struct InFlight {
    counters: HashMap<Address, Arc<AtomicU64>>,
    /// Map size at which the next prune happens.
    prune_at: usize,
}

/// Marks one call in flight for least-active balancing; dropping it marks the call finished.
#[derive(Debug)]
pub struct CallGuard {
    counter: Arc<AtomicU64>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// 64-bit FNV-1a offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// 64-bit FNV-1a continued from `hash`: stable across processes and versions, unlike the std
/// hasher.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// MurmurHash3's 64-bit finaliser. FNV-1a leaves its last bytes in the low bits only, so
/// addresses differing in the port or last octet got nearly equal high bits: one of five
/// ports on a host took half the keys, and weights lost to that skew.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A rendezvous score in (0, 1) from a candidate's hash of `"{key}#{address}"`.
fn unit_interval(h: u64) -> f64 {
    ((fmix64(h) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

impl Balancer {
    /// A balancer with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks a candidate with `strategy`; `key` is the call key for consistent hashing (a
    /// missing key falls back to weighted random).
    pub fn pick(
        &self,
        strategy: LoadBalance,
        candidates: &[Candidate],
        key: Option<&str>,
    ) -> Option<usize> {
        self.pick_among(strategy, candidates.iter().copied().enumerate(), key)
    }

    /// [`pick`](Balancer::pick) over `(tag, candidate)` pairs, returning the chosen tag. Random
    /// and consistent-hash picks allocate nothing, so selection can filter lazily.
    pub(crate) fn pick_among<I>(
        &self,
        strategy: LoadBalance,
        candidates: I,
        key: Option<&str>,
    ) -> Option<usize>
    where
        I: Iterator<Item = (usize, Candidate)> + Clone,
    {
        match (strategy, key) {
            (LoadBalance::Random, _) | (LoadBalance::ConsistentHash, None) => {
                weighted_random(candidates)
            }
            (LoadBalance::ConsistentHash, Some(key)) => rendezvous(candidates, key),
            (LoadBalance::RoundRobin, _) => {
                let mut set: Vec<(usize, Candidate)> = candidates.collect();
                // Sorted, the same set reached in any order has one rotation.
                set.sort_unstable_by_key(|(_, c)| (c.address, c.weight));
                let chosen = self.smooth_round_robin(&set)?;
                set.get(chosen).map(|(tag, _)| *tag)
            }
            (LoadBalance::LeastActive, _) => {
                let (tags, list): (Vec<usize>, Vec<Candidate>) = candidates.unzip();
                if list.is_empty() {
                    return None;
                }
                tags.get(self.least_active(&list)).copied()
            }
        }
    }

    /// Records a call starting on `address`; the returned guard records its end.
    pub fn start_call(&self, address: Address) -> CallGuard {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.counters.len() >= active.prune_at.max(ACTIVE_PRUNE_FLOOR) {
            // Only the map holds an idle counter (no guard clones it): dropping it is the same
            // as keeping 0, and departed addresses would otherwise pile up forever.
            active.counters.retain(|_, c| Arc::strong_count(c) > 1);
            active.prune_at = active.counters.len().saturating_mul(2);
        }
        let counter = active.counters.entry(address).or_default().clone();
        drop(active);
        counter.fetch_add(1, Ordering::Relaxed);
        CallGuard { counter }
    }

    /// Calls in flight on `address`.
    pub fn active_calls(&self, address: Address) -> u64 {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters
            .get(&address)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Nginx's smooth weighted round robin over `set` (sorted by address and weight), with
    /// the positions of exactly this set; `None` only for an empty set.
    fn smooth_round_robin(&self, set: &[(usize, Candidate)]) -> Option<usize> {
        if set.is_empty() {
            return None;
        }
        let key = set.iter().fold(FNV_OFFSET, |h, (_, c)| {
            let h = fnv1a(h, &c.address.ip.octets());
            let h = fnv1a(h, &c.address.port.to_le_bytes());
            fnv1a(h, &c.weight.to_le_bytes())
        });
        let mut rotations = self.round_robin.lock().unwrap_or_else(|p| p.into_inner());
        let Rotations { sets, clock } = &mut *rotations;
        *clock += 1;
        if sets.len() >= ROTATIONS && !sets.contains_key(&key) {
            let oldest = sets.iter().min_by_key(|(_, r)| r.used).map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                sets.remove(&oldest);
            }
        }
        let rotation = sets.entry(key).or_insert_with(|| Rotation::new(set));
        if !rotation.is_over(set) {
            // Another set with the same hash: this one starts over rather than share.
            *rotation = Rotation::new(set);
        }
        rotation.used = *clock;
        Some(rotation.next())
    }

    /// Candidate sets with round-robin positions (for tests of the bound).
    #[cfg(test)]
    fn rotations(&self) -> usize {
        self.round_robin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sets
            .len()
    }

    /// Addresses with an in-flight counter (for tests of the pruning).
    #[cfg(test)]
    fn tracked_addresses(&self) -> usize {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters
            .len()
    }

    fn least_active(&self, candidates: &[Candidate]) -> usize {
        // Weight 0 takes no calls unless every weight is 0, however idle it is.
        let any_weight = candidates.iter().any(|c| c.weight > 0);
        let eligible = |c: &Candidate| !any_weight || c.weight > 0;
        let active: Vec<u64> = candidates
            .iter()
            .map(|c| self.active_calls(c.address))
            .collect();
        let least = candidates
            .iter()
            .zip(&active)
            .filter(|(c, _)| eligible(c))
            .map(|(_, a)| *a)
            .min()
            .unwrap_or(0);
        // By position, not address: one address can be listed twice (two versions of an
        // instance), with different weights.
        let tied: Vec<(usize, Candidate)> = candidates
            .iter()
            .zip(&active)
            .enumerate()
            .filter(|(_, (c, a))| eligible(c) && **a == least)
            .map(|(i, (c, _))| (i, *c))
            .collect();
        weighted_random(tied.into_iter()).unwrap_or(0)
    }
}

/// Picks a new rotation skips, at most: its first pick is at a random point of the first this
/// many of its sequence (all of it when its period is shorter).
const ROTATION_START_SKIPS: u64 = 64;

/// Picks before a smooth weighted round robin over `members` repeats itself: the sum of the
/// weights over their greatest common divisor (each member once, when every weight is 0).
fn rotation_period(members: &[Candidate]) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let weights = members
        .iter()
        .map(|c| u64::from(c.weight))
        .filter(|w| *w > 0);
    let divisor = weights.clone().fold(0, gcd);
    if divisor == 0 {
        return members.len() as u64;
    }
    weights.map(|w| w / divisor).sum()
}

impl Rotation {
    /// A rotation at a random point of its sequence, as gRPC's round robin starts at a random
    /// index: from the start, every consumer (after a deploy, a weight change, or a set's
    /// eviction) would send its first call to the same instance.
    fn new(set: &[(usize, Candidate)]) -> Self {
        let mut rotation = Rotation {
            members: set.iter().map(|(_, c)| *c).collect(),
            current: vec![0; set.len()],
            used: 0,
        };
        // Uniform over the period's points, so the first pick is weighted as every pick is.
        let skips = random_below(rotation_period(&rotation.members).min(ROTATION_START_SKIPS));
        for _ in 0..skips {
            rotation.next();
        }
        rotation
    }

    fn is_over(&self, set: &[(usize, Candidate)]) -> bool {
        self.members.len() == set.len() && self.members.iter().zip(set).all(|(m, (_, c))| m == c)
    }

    /// The next member: every weight is added to its current value, the largest wins and
    /// gives back the total.
    fn next(&mut self) -> usize {
        let mut total: i64 = self.members.iter().map(|c| i64::from(c.weight)).sum();
        // All weights 0 means equal shares, as for the other strategies.
        let equal = total == 0;
        if equal {
            total = self.members.len() as i64;
        }
        let mut best = 0;
        let mut best_value = i64::MIN;
        for (i, (c, value)) in self.members.iter().zip(&mut self.current).enumerate() {
            if !equal && c.weight == 0 {
                // A drained instance takes no calls while another has weight.
                continue;
            }
            *value += if equal { 1 } else { i64::from(c.weight) };
            if *value > best_value {
                best_value = *value;
                best = i;
            }
        }
        if let Some(value) = self.current.get_mut(best) {
            *value -= total;
        }
        best
    }
}

thread_local! {
    /// Each thread's generator for random picks: they need uniform numbers, not secret ones,
    /// so a small fast generator, seeded once per thread from the OS-seeded `thread_rng`
    /// (ChaCha's block refills cost a random pick a tenth of its time).
    static PICKS: RefCell<SmallRng> = RefCell::new(
        SmallRng::from_rng(rand::thread_rng()).unwrap_or_else(|_| SmallRng::seed_from_u64(seed_of_time())),
    );
}

/// A fallback seed, should the OS-seeded generator fail.
fn seed_of_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A uniform random number in `0..bound` (0 for a bound of 0).
pub(crate) fn random_below(bound: u64) -> u64 {
    if bound == 0 {
        return 0;
    }
    PICKS.with(|rng| rng.borrow_mut().gen_range(0..bound))
}

/// Weighted random over `(tag, candidate)` pairs (uniform when every weight is 0); `None` only
/// when there are none.
fn weighted_random<I>(candidates: I) -> Option<usize>
where
    I: Iterator<Item = (usize, Candidate)> + Clone,
{
    let (count, total) = candidates.clone().fold((0usize, 0u64), |(n, t), (_, c)| {
        (n + 1, t + u64::from(c.weight))
    });
    if count == 0 {
        return None;
    }
    if total == 0 {
        let nth = usize::try_from(random_below(count as u64)).unwrap_or(0);
        return candidates.map(|(tag, _)| tag).nth(nth);
    }
    let mut point = random_below(total);
    let mut last = None;
    for (tag, c) in candidates {
        let w = u64::from(c.weight);
        if point < w {
            return Some(tag);
        }
        point -= w;
        last = Some(tag);
    }
    last
}

/// Weighted rendezvous hashing: the same key keeps its instance while that instance lives,
/// and only keys of a removed instance move. Hashes `"{key}#{address}"` per candidate.
fn rendezvous<I>(candidates: I, key: &str) -> Option<usize>
where
    I: Iterator<Item = (usize, Candidate)> + Clone,
{
    // Weight 0 takes no keys unless every weight is 0 (then all count as 1).
    let any_weight = candidates.clone().any(|(_, c)| c.weight > 0);
    let prefix = fnv1a(fnv1a(FNV_OFFSET, key.as_bytes()), b"#");
    let mut best = None;
    let mut best_score = f64::NEG_INFINITY;
    for (tag, c) in candidates {
        if any_weight && c.weight == 0 {
            continue;
        }
        // "255.255.255.255:65535" fits; formatting on the stack keeps the pick allocation-free.
        let mut buf = [0u8; 32];
        let mut free = &mut buf[..];
        let h = match write!(free, "{}", c.address) {
            Ok(()) => {
                let len = 32 - free.len();
                fnv1a(prefix, &buf[..len])
            }
            Err(_) => fnv1a(prefix, c.address.to_string().as_bytes()),
        };
        // Score -w / ln(u): larger weight, larger share.
        let u = unit_interval(h);
        let score = -f64::from(c.weight.max(1)) / u.ln();
        if best.is_none() || score > best_score {
            best_score = score;
            best = Some(tag);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Candidate {
                address: Address {
                    ip: [10, 0, 0, i as u8 + 1].into(),
                    port: 9090,
                },
                weight: *w,
            })
            .collect()
    }

    #[test]
    fn smooth_round_robin_is_nginx_sequence() {
        let b = Balancer::new();
        let c = cands(&[5, 1, 1]);
        let seq: String = (0..7)
            .map(|_| ["a", "b", "c"][b.pick(LoadBalance::RoundRobin, &c, None).unwrap()])
            .collect();
        // One period, from wherever the rotation started.
        assert!("aabacaa".repeat(2).contains(&seq), "{seq}");
    }

    #[test]
    fn a_fresh_rotations_first_pick_is_weighted() {
        // Weights 2:1 (period a, b, a): the first pick of fresh rotations goes 2:1 too.
        let c = cands(&[200, 100]);
        let firsts = (0..3000)
            .filter(|_| Balancer::new().pick(LoadBalance::RoundRobin, &c, None) == Some(0))
            .count();
        assert!(
            (1800..2200).contains(&firsts),
            "{firsts} of 3000 to the heavier"
        );
        assert_eq!(rotation_period(&c), 3);
        assert_eq!(rotation_period(&cands(&[0, 0, 0])), 3);
        assert_eq!(rotation_period(&cands(&[0, 5])), 1);
    }

    #[test]
    fn fresh_rotations_start_at_different_members() {
        // Consumers starting together (after a deploy) spread their first calls.
        let c = cands(&[100; 4]);
        let first: std::collections::BTreeSet<usize> = (0..200)
            .map(|_| {
                Balancer::new()
                    .pick(LoadBalance::RoundRobin, &c, None)
                    .unwrap()
            })
            .collect();
        assert_eq!(first, [0, 1, 2, 3].into());
    }

    #[test]
    fn weighted_random_matches_weights() {
        let b = Balancer::new();
        let c = cands(&[100, 200, 700]);
        let mut counts = [0u32; 3];
        let n = 100_000;
        for _ in 0..n {
            counts[b.pick(LoadBalance::Random, &c, None).unwrap()] += 1;
        }
        for (i, expected) in [0.1, 0.2, 0.7].iter().enumerate() {
            let share = f64::from(counts[i]) / f64::from(n);
            assert!(
                (share - expected).abs() < 0.02,
                "instance {i}: {share} vs {expected}"
            );
        }
    }

    #[test]
    fn consistent_hash_is_stable_and_weighted() {
        let b = Balancer::new();
        let c = cands(&[100, 100, 200]);
        let first: Vec<_> = (0..1000)
            .map(|k| {
                b.pick(LoadBalance::ConsistentHash, &c, Some(&k.to_string()))
                    .unwrap()
            })
            .collect();
        let again: Vec<_> = (0..1000)
            .map(|k| {
                b.pick(LoadBalance::ConsistentHash, &c, Some(&k.to_string()))
                    .unwrap()
            })
            .collect();
        assert_eq!(first, again);
        let heavy = first.iter().filter(|i| **i == 2).count();
        assert!(
            (400..600).contains(&heavy),
            "weight-200 instance got {heavy} of 1000"
        );
        // Removing instance 0 moves only its keys.
        let without: Vec<_> = c[1..].to_vec();
        for (k, before) in first.iter().enumerate() {
            let after = b
                .pick(LoadBalance::ConsistentHash, &without, Some(&k.to_string()))
                .unwrap()
                + 1;
            if *before != 0 {
                assert_eq!(after, *before, "key {k} moved although its instance stayed");
            }
        }
    }

    /// Keys per candidate out of 10 000.
    fn consistent_shares(c: &[Candidate]) -> Vec<u32> {
        let b = Balancer::new();
        let mut shares = vec![0u32; c.len()];
        for k in 0..10_000 {
            let key = format!("user-{k}");
            shares[b.pick(LoadBalance::ConsistentHash, c, Some(&key)).unwrap()] += 1;
        }
        shares
    }

    fn at(ip: [u8; 4], port: u16, weight: u32) -> Candidate {
        Candidate {
            address: Address {
                ip: ip.into(),
                port,
            },
            weight,
        }
    }

    #[test]
    fn consistent_hash_follows_weights_whatever_the_addresses_share() {
        // Bounds are about 5 standard deviations wide: a fair hash stays inside them.
        let ports: Vec<_> = (0..5).map(|i| at([10, 0, 0, 1], 9090 + i, 100)).collect();
        let shares = consistent_shares(&ports);
        assert!(
            shares.iter().all(|n| (1_800..2_200).contains(n)),
            "five ports of one host, equal weights: {shares:?}"
        );
        let octets: Vec<_> = (10..15).map(|i| at([192, 168, 1, i], 9090, 100)).collect();
        let shares = consistent_shares(&octets);
        assert!(
            shares.iter().all(|n| (1_800..2_200).contains(n)),
            "five hosts differing in the last octet: {shares:?}"
        );
        for pair in [
            [at([10, 0, 0, 1], 9090, 100), at([10, 0, 0, 1], 9091, 300)],
            [at([10, 0, 0, 1], 9090, 100), at([10, 0, 0, 2], 9090, 300)],
        ] {
            let shares = consistent_shares(&pair);
            assert!(
                (2_300..2_700).contains(&shares[0]),
                "weights 100 and 300 should split 1:3: {shares:?}"
            );
        }
    }

    #[test]
    fn consistent_hash_scores_key_hash_address() {
        // Pinned to the text "{key}#{ip:port}": changing it would move every key on upgrade.
        let c = cands(&[100, 100, 100, 100]);
        for k in 0..200 {
            let key = format!("user-{k}");
            let expected = c
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let h = fnv1a(FNV_OFFSET, format!("{key}#{}", c.address).as_bytes());
                    (i, -100.0 / unit_interval(h).ln())
                })
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(i, _)| i);
            assert_eq!(
                Balancer::new().pick(LoadBalance::ConsistentHash, &c, Some(&key)),
                expected
            );
        }
    }

    #[test]
    fn empty_and_zero_weight_lists() {
        let b = Balancer::new();
        for strategy in [
            LoadBalance::Random,
            LoadBalance::RoundRobin,
            LoadBalance::LeastActive,
            LoadBalance::ConsistentHash,
        ] {
            assert_eq!(b.pick(strategy, &[], Some("k")), None);
            let zero = cands(&[0, 0, 0]);
            let mut seen = [false; 3];
            for k in 0..300 {
                let i = b.pick(strategy, &zero, Some(&k.to_string())).unwrap();
                seen[i] = true;
            }
            assert_eq!(
                seen, [true; 3],
                "{strategy:?} never picked some zero-weight instance"
            );
        }
    }

    #[test]
    fn zero_weight_is_never_picked_when_another_has_weight() {
        let b = Balancer::new();
        let c = cands(&[0, 100, 0, 100]);
        // The drained instances are idle; the weighted ones are busy.
        let _busy = [b.start_call(c[1].address), b.start_call(c[3].address)];
        let offenders: Vec<LoadBalance> = [
            LoadBalance::Random,
            LoadBalance::RoundRobin,
            LoadBalance::LeastActive,
            LoadBalance::ConsistentHash,
        ]
        .into_iter()
        .filter(|strategy| {
            (0..300).any(|k| {
                let i = b.pick(*strategy, &c, Some(&k.to_string())).unwrap();
                c[i].weight == 0
            })
        })
        .collect();
        assert!(
            offenders.is_empty(),
            "{offenders:?} picked a zero-weight instance"
        );
    }

    #[test]
    fn round_robin_drained_instance_gets_no_call_from_its_old_position() {
        // a=1, b=2, at every point of the rotation (a's position is positive at one of them):
        // then a is drained (weight 0), and it must not be picked on its leftover position.
        for before in 0..6 {
            let b = Balancer::new();
            let pick = |c: &[Candidate]| b.pick(LoadBalance::RoundRobin, c, None).unwrap();
            for _ in 0..before {
                pick(&cands(&[1, 2]));
            }
            for _ in 0..10 {
                assert_eq!(pick(&cands(&[0, 2])), 1, "after {before} picks");
            }
        }
    }

    #[test]
    fn round_robin_rotates_when_calls_see_different_subsets() {
        // Calls of two methods routed to different instances interleave: each must still
        // rotate over its own instances.
        let b = Balancer::new();
        let all = cands(&[100, 100, 100]);
        let (first_two, third) = (&all[..2], &all[2..]);
        let mut picked = Vec::new();
        for _ in 0..4 {
            picked.push(b.pick(LoadBalance::RoundRobin, first_two, None).unwrap());
            assert_eq!(b.pick(LoadBalance::RoundRobin, third, None), Some(0));
        }
        assert!(
            picked == [0, 1, 0, 1] || picked == [1, 0, 1, 0],
            "{picked:?}"
        );
    }

    #[test]
    fn round_robin_rotates_each_overlapping_set_by_weight() {
        // Two methods routed to overlapping sets, calls interleaved: [a, b] used to go to b
        // on almost every call, because [a, b, c]'s picks moved the shared positions.
        let b = Balancer::new();
        let pick = |c: &[Candidate]| b.pick(LoadBalance::RoundRobin, c, None).unwrap();
        for weights in [[100, 100, 100], [100, 300, 200]] {
            let all = cands(&weights);
            let two = &all[..2];
            let (mut of_two, mut of_all) = ([0u32; 2], [0u32; 3]);
            for _ in 0..1200 {
                of_two[pick(two)] += 1;
                of_all[pick(&all)] += 1;
            }
            let share = |w: u32, total: u32| 1200 * w / total;
            let (w0, w1, w2) = (weights[0], weights[1], weights[2]);
            assert_eq!(
                of_two,
                [share(w0, w0 + w1), share(w1, w0 + w1)],
                "weights {weights:?}: picks over [a, b]"
            );
            let sum = w0 + w1 + w2;
            assert_eq!(
                of_all,
                [share(w0, sum), share(w1, sum), share(w2, sum)],
                "weights {weights:?}: picks over [a, b, c]"
            );
        }
    }

    #[test]
    fn round_robin_set_in_another_order_shares_its_rotation() {
        let b = Balancer::new();
        let c = cands(&[100, 100]);
        let reversed = [c[1], c[0]];
        let mut picked = Vec::new();
        for _ in 0..2 {
            picked.push(c[b.pick(LoadBalance::RoundRobin, &c, None).unwrap()].address);
            picked
                .push(reversed[b.pick(LoadBalance::RoundRobin, &reversed, None).unwrap()].address);
        }
        let (a, b) = (c[0].address, c[1].address);
        assert!(
            picked == [a, b, a, b] || picked == [b, a, b, a],
            "{picked:?}"
        );
    }

    #[test]
    fn round_robin_keeps_a_bounded_number_of_sets() {
        let b = Balancer::new();
        let all = cands(&[100; 200]);
        for end in 1..=all.len() {
            b.pick(LoadBalance::RoundRobin, &all[..end], None).unwrap();
        }
        assert_eq!(b.rotations(), ROTATIONS);
    }

    #[test]
    fn idle_in_flight_counters_are_pruned_busy_ones_kept() {
        let b = Balancer::new();
        let address = |i: u32| Address {
            ip: (0x0a00_0000 + i).into(),
            port: 9090,
        };
        let busy = b.start_call(address(0));
        // Instances come and go: each address takes one call and is never seen again.
        for i in 1..=10_000 {
            drop(b.start_call(address(i)));
        }
        assert!(
            b.tracked_addresses() <= ACTIVE_PRUNE_FLOOR,
            "{} counters kept after 10000 finished calls",
            b.tracked_addresses()
        );
        assert_eq!(
            b.active_calls(address(0)),
            1,
            "a call in flight was forgotten"
        );
        drop(busy);
        assert_eq!(b.active_calls(address(0)), 0);
    }

    #[test]
    fn least_active_prefers_idle_instances() {
        let b = Balancer::new();
        let c = cands(&[100, 100]);
        let _busy = b.start_call(c[0].address);
        for _ in 0..50 {
            assert_eq!(b.pick(LoadBalance::LeastActive, &c, None), Some(1));
        }
        drop(_busy);
        assert_eq!(b.active_calls(c[0].address), 0);
    }

    /// One address listed twice (two versions of an instance): the pick is the weighted one,
    /// not the first entry with its address (which used to be returned).
    #[test]
    fn least_active_returns_the_entry_it_picked() {
        let b = Balancer::new();
        let mut c = cands(&[0, 100]);
        c[1].address = c[0].address;
        for _ in 0..50 {
            assert_eq!(b.pick(LoadBalance::LeastActive, &c, None), Some(1));
        }
    }
}

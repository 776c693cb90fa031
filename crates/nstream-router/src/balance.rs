//! Least-request balancing: the Ready endpoint with the fewest requests in flight from this
//! router, ties broken round-robin so that an idle model's requests still spread over its pods.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::table::Endpoint;

/// Picks endpoints; one per router (its tie counter is shared by every model).
#[derive(Debug, Default)]
pub struct Balancer {
    ties: AtomicUsize,
}

impl Balancer {
    /// The endpoint with the fewest requests in flight, other than `exclude` (the one that just
    /// failed) when another exists; `None` when `endpoints` is empty.
    pub fn pick(&self, endpoints: &[Arc<Endpoint>], exclude: Option<&Endpoint>) -> Option<Arc<Endpoint>> {
        let candidates: Vec<&Arc<Endpoint>> = match exclude {
            Some(excluded) if endpoints.len() > 1 => {
                endpoints.iter().filter(|endpoint| endpoint.authority() != excluded.authority()).collect()
            }
            _ => endpoints.iter().collect(),
        };
        // One snapshot of the counts: they move while this runs (other requests start and end),
        // and reading them twice could leave no endpoint at the minimum.
        let counts: Vec<(usize, &&Arc<Endpoint>)> =
            candidates.iter().map(|endpoint| (endpoint.in_flight(), endpoint)).collect();
        let least = counts.iter().map(|(count, _)| *count).min()?;
        let tied: Vec<&&Arc<Endpoint>> =
            counts.iter().filter(|(count, _)| *count == least).map(|(_, endpoint)| *endpoint).collect();
        let turn = self.ties.fetch_add(1, Ordering::Relaxed);
        tied.get(turn % tied.len().max(1)).map(|endpoint| Arc::clone(endpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(count: usize) -> Vec<Arc<Endpoint>> {
        (0..count).map(|index| Arc::new(Endpoint::new(format!("127.0.0.{}:8080", index + 1)))).collect()
    }

    #[test]
    fn the_endpoint_with_fewest_requests_in_flight_wins() {
        let balancer = Balancer::default();
        let pods = endpoints(3);
        let _busy = [pods[0].start(), pods[0].start(), pods[1].start()];
        for _ in 0..5 {
            assert_eq!(balancer.pick(&pods, None).expect("one").authority(), "127.0.0.3:8080");
        }
    }

    #[test]
    fn ties_are_broken_round_robin() {
        let balancer = Balancer::default();
        let pods = endpoints(2);
        let picks: Vec<String> =
            (0..4).map(|_| balancer.pick(&pods, None).expect("one").authority().to_owned()).collect();
        assert_eq!(picks.iter().filter(|pick| pick.as_str() == "127.0.0.1:8080").count(), 2, "{picks:?}");
        assert_ne!(picks[0], picks[1]);
    }

    #[test]
    fn concurrent_requests_spread_over_every_pod() {
        let balancer = Balancer::default();
        let pods = endpoints(2);
        let guards: Vec<_> = (0..6).map(|_| balancer.pick(&pods, None).expect("one").start()).collect();
        assert_eq!((pods[0].in_flight(), pods[1].in_flight()), (3, 3));
        drop(guards);
    }

    #[test]
    fn picking_while_counts_change_never_panics() {
        let balancer = Arc::new(Balancer::default());
        let pods = Arc::new(endpoints(4));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (balancer, pods) = (Arc::clone(&balancer), Arc::clone(&pods));
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let guard = balancer.pick(&pods, None).expect("one").start();
                        drop(guard);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("no panic while counts change");
        }
    }

    #[test]
    fn a_failed_endpoint_is_avoided_when_another_exists() {
        let balancer = Balancer::default();
        let pods = endpoints(2);
        let _busy = [pods[1].start(), pods[1].start()];
        let failed = Arc::clone(&pods[0]);
        assert_eq!(balancer.pick(&pods, Some(&failed)).expect("the other").authority(), "127.0.0.2:8080");
        assert_eq!(balancer.pick(&pods[..1], Some(&failed)).expect("the only one").authority(), "127.0.0.1:8080");
        assert!(balancer.pick(&[], None).is_none());
    }
}

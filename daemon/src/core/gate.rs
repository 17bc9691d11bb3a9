//! A bounded pool of fetch slots shared by three priorities. Waiters of a higher
//! priority are always served first, and the lower priorities may never take the last
//! few slots, so an on-demand miss never queues behind prefetches.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A reader is blocked on this data.
    OnDemand = 0,
    /// Trace-driven prefetch.
    Prefetch = 1,
    /// Background fill of a whole image.
    Background = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::OnDemand, Priority::Prefetch, Priority::Background];
}

struct State {
    /// Slots in use, per priority.
    used: [usize; 3],
    waiters: [VecDeque<oneshot::Sender<()>>; 3],
}

pub struct Gate {
    total: usize,
    /// Most slots each priority may hold at once.
    caps: [usize; 3],
    state: Mutex<State>,
}

pub struct Permit {
    gate: Arc<Gate>,
    prio: Priority,
}

/// A queued `acquire`. Dropping it (the caller stopped waiting, e.g. a prefetch promoted
/// to on-demand) gives back a slot that was handed to it in the meantime, so `acquire`
/// is cancel-safe.
struct Waiting<'a> {
    gate: &'a Arc<Gate>,
    prio: Priority,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.gate.release(self.prio);
            }
        }
    }
}

impl Gate {
    /// `total` concurrent fetches; prefetch may use all but a quarter of them, the
    /// background fill a quarter.
    pub fn new(total: usize) -> Arc<Gate> {
        let total = total.max(2);
        let reserve = (total / 4).max(1);
        Arc::new(Gate {
            total,
            caps: [total, total - reserve, reserve],
            state: Mutex::new(State {
                used: [0; 3],
                waiters: Default::default(),
            }),
        })
    }

    fn can_take(&self, st: &State, p: Priority) -> bool {
        let used: usize = st.used.iter().sum();
        used < self.total && st.used[p as usize] < self.caps[p as usize]
    }

    pub async fn acquire(self: &Arc<Self>, prio: Priority) -> Permit {
        let rx = {
            let mut st = self.state.lock().expect("gate lock");
            let higher_waiting = Priority::ALL[..prio as usize]
                .iter()
                .any(|p| !st.waiters[*p as usize].is_empty());
            if !higher_waiting && st.waiters[prio as usize].is_empty() && self.can_take(&st, prio) {
                st.used[prio as usize] += 1;
                return Permit {
                    gate: self.clone(),
                    prio,
                };
            }
            let (tx, rx) = oneshot::channel();
            st.waiters[prio as usize].push_back(tx);
            rx
        };
        let mut waiting = Waiting {
            gate: self,
            prio,
            rx: Some(rx),
        };
        // The sender is only dropped after the slot was accounted to us.
        let _ = waiting.rx.as_mut().expect("set above").await;
        waiting.rx = None;
        Permit {
            gate: self.clone(),
            prio,
        }
    }

    fn release(&self, prio: Priority) {
        let mut st = self.state.lock().expect("gate lock");
        st.used[prio as usize] -= 1;
        // Hand freed slots to waiters, highest priority first.
        'outer: loop {
            for p in Priority::ALL {
                if st.waiters[p as usize].is_empty() || !self.can_take(&st, p) {
                    continue;
                }
                let tx = st.waiters[p as usize].pop_front().expect("non-empty");
                st.used[p as usize] += 1;
                if tx.send(()).is_err() {
                    // The waiter went away: give the slot back and look again.
                    st.used[p as usize] -= 1;
                }
                continue 'outer;
            }
            break;
        }
    }

    /// (in use, waiting) per priority, for metrics.
    pub fn snapshot(&self) -> [(usize, usize); 3] {
        let st = self.state.lock().expect("gate lock");
        [0, 1, 2].map(|i| (st.used[i], st.waiters[i].len()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release(self.prio);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_abandoned_wait_gives_its_slot_back() {
        let gate = Gate::new(2); // prefetch may hold 1
        let held = gate.acquire(Priority::Prefetch).await;
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.acquire(Priority::Prefetch).await });
        tokio::task::yield_now().await;
        assert_eq!(gate.snapshot()[1], (1, 1));
        // The slot is handed to the waiter, which is aborted before it could take it.
        drop(held);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(gate.snapshot()[1], (0, 0), "the slot leaked");
        let _again = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            gate.acquire(Priority::Prefetch),
        )
        .await
        .expect("the slot is free again");
    }

    #[tokio::test]
    async fn on_demand_overtakes_queued_prefetch() {
        let gate = Gate::new(4); // prefetch may hold 3, background 1
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(gate.acquire(Priority::Prefetch).await);
        }
        // A fourth prefetch must wait (cap), but an on-demand fetch gets the reserve.
        let g = gate.clone();
        let queued = tokio::spawn(async move { g.acquire(Priority::Prefetch).await });
        tokio::task::yield_now().await;
        let od = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            gate.acquire(Priority::OnDemand),
        )
        .await
        .expect("on-demand is never blocked by prefetch");
        assert_eq!(gate.snapshot()[1], (3, 1));
        // Another on-demand waiter queued behind the full pool is served before the
        // queued prefetch when a prefetch slot frees up.
        let g = gate.clone();
        let od2 = tokio::spawn(async move { g.acquire(Priority::OnDemand).await });
        tokio::task::yield_now().await;
        drop(held.pop());
        let od2 = tokio::time::timeout(std::time::Duration::from_secs(1), od2)
            .await
            .unwrap()
            .unwrap();
        assert!(!queued.is_finished());
        drop(od);
        drop(od2);
        tokio::time::timeout(std::time::Duration::from_secs(1), queued)
            .await
            .unwrap()
            .unwrap();
    }
}

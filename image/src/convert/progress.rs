//! The conversion's progress bar: bytes read from the source, packs new vs reused.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    new: Arc<AtomicU64>,
    reused: Arc<AtomicU64>,
    layers: usize,
}

impl Progress {
    /// `enabled` false draws nothing (tests, logs); indicatif also stays quiet when
    /// stderr is not a terminal.
    pub fn new(enabled: bool, total_bytes: u64, layers: usize) -> Progress {
        let bar = if enabled {
            ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        let p = Progress {
            bar,
            new: Arc::new(AtomicU64::new(0)),
            reused: Arc::new(AtomicU64::new(0)),
            layers,
        };
        p.redraw_message();
        p
    }

    /// A callback that counts bytes read from layer `n`.
    pub fn layer_reader(&self, n: usize) -> impl Fn(u64) + Send + Sync + 'static {
        self.bar
            .set_prefix(format!("layer {}/{}", n + 1, self.layers));
        let bar = self.bar.clone();
        move |len| bar.inc(len)
    }

    pub fn pack_done(&self, uploaded: bool) {
        if uploaded {
            self.new.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
        self.redraw_message();
    }

    fn redraw_message(&self) {
        self.bar.set_message(format!(
            "packs: {} new, {} reused",
            self.new.load(Ordering::Relaxed),
            self.reused.load(Ordering::Relaxed)
        ));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

//! Progress of long operations: indicatif bars when stderr is a terminal, plain lines on stderr
//! otherwise (stdout stays for the result, so `--json` output is one clean document).

use std::io::IsTerminal;
use std::time::Duration;

use ferry_client::{Progress, ReceiveProgress};
use indicatif::{ProgressBar, ProgressStyle};

/// Reports progress of one operation.
pub struct Reporter {
    bar: Option<ProgressBar>,
}

impl Reporter {
    /// A reporter for `what` ("send", "receive").
    pub fn new(what: &str) -> Reporter {
        if !std::io::stderr().is_terminal() {
            return Reporter { bar: None };
        }
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Reporter { bar: Some(bar) }
    }

    /// After each applied batch of a send.
    pub fn send(&self, p: Progress) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(p.events_total.max(p.events_sent));
                bar.set_position(p.events_sent);
                bar.set_message(format!("events, batch {}/{}", p.batches_sent, p.batches_total.max(p.batches_sent)));
            }
            None => eprintln!(
                "sent batch {}/{} ({}/{} events)",
                p.batches_sent,
                p.batches_total.max(p.batches_sent),
                p.events_sent,
                p.events_total.max(p.events_sent)
            ),
        }
    }

    /// After each staged page of a receive.
    pub fn receive(&self, p: ReceiveProgress) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(p.rows_total.max(p.rows_received));
                bar.set_position(p.rows_received);
                bar.set_message(format!("rows, {} pages", p.pages));
            }
            None => {
                let total =
                    if p.rows_total > 0 { format!("/{}", p.rows_total.max(p.rows_received)) } else { String::new() };
                eprintln!("received page {} ({}{} rows)", p.pages, p.rows_received, total);
            }
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}

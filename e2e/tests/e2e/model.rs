//! Model-based property test (issue 5, scenario 5): random sequences of device operations across
//! 3 devices of 2 users (d0, d1: alice; d2: bob) against one real server per backend, checked at
//! every quiescent point against a small in-memory model of the server's state.
//!
//! What the model holds: every customer (everyone-scoped, merge policy), keyed by a unique name the
//! test generates, with its city; every invoice (claim-scoped: `salesperson_id` = the device's
//! user), keyed by a unique tag in `created_at`, with its customer's name, its user and its total.
//! A device only updates or deletes rows it created, so no conflict arises; the model predicts the
//! server's verdicts that remain: deleting a customer some invoice references fails, inserting an
//! invoice whose customer is gone fails, touching a row that is gone fails. Events reach the model
//! when a send succeeds (a faulted send retries until the server's answer arrives; an offline
//! send must fail and change nothing), including second writes to rows the device already
//! updated since its last send (which once conflicted with the device's own writes; see
//! [`self_conflicts`]).
//!
//! At a quiescent point (every device sent, discarded its failed events — each must carry a
//! failure code and message — sent again and received) it asserts: server rows == model; each
//! device's customers == the server's, each device's invoices == its user's on the server (ids
//! included); no foreign key dangles on the server or any device; no temporary key survives; the
//! pending logs are empty. Cases: `FERRY_MODEL_CASES` (default 8), up to `FERRY_MODEL_OPS`
//! operations (default 30), seed `FERRY_MODEL_SEED` (default fixed).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_client::{Client, ClientConfig, EventStatus};
use ferry_e2e::device::{fk_violations, local_i64};
use ferry_e2e::model::{device_lines, server_lines, unsent};
use ferry_e2e::{Fault, Proxy, Site};
use ferry_server::backend_tests;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

const DEVICES: usize = 3;
const USERS: [&str; DEVICES] = ["alice", "alice", "bob"];

/// One step of the generated program. `pick` chooses among the candidate rows (modulo their
/// number); an operation without a candidate does nothing.
#[derive(Debug, Clone)]
enum Op {
    InsertCustomer {
        dev: usize,
    },
    UpdateCustomer {
        dev: usize,
        pick: usize,
        city: u8,
    },
    DeleteCustomer {
        dev: usize,
        pick: usize,
    },
    InsertInvoice {
        dev: usize,
        pick: usize,
        total: u8,
    },
    UpdateInvoice {
        dev: usize,
        pick: usize,
        total: u8,
    },
    DeleteInvoice {
        dev: usize,
        pick: usize,
    },
    Checkpoint {
        dev: usize,
    },
    Send {
        dev: usize,
        fault: SendFault,
    },
    Receive {
        dev: usize,
    },
    /// The proxy refuses every connection: a send (if anything is unsent) and a receive fail.
    Offline {
        dev: usize,
    },
    /// The device process dies and the database is reopened.
    Reopen {
        dev: usize,
    },
    /// Everyone sends and receives; then the invariants are checked.
    Quiesce,
}

/// The fault the first connection of a send meets (the send retries through it).
#[derive(Debug, Clone, Copy)]
enum SendFault {
    None,
    DropResponse,
    CutRequest(u16),
    CutResponse(u16),
}

fn op() -> impl Strategy<Value = Op> {
    let dev = 0..DEVICES;
    let fault = prop_oneof![
        2 => Just(SendFault::None),
        1 => Just(SendFault::DropResponse),
        1 => (0u16..1500).prop_map(SendFault::CutRequest),
        1 => (0u16..600).prop_map(SendFault::CutResponse),
    ];
    prop_oneof![
        4 => dev.clone().prop_map(|dev| Op::InsertCustomer { dev }),
        2 => (dev.clone(), 0..8usize, 0..4u8).prop_map(|(dev, pick, city)| Op::UpdateCustomer { dev, pick, city }),
        2 => (dev.clone(), 0..8usize).prop_map(|(dev, pick)| Op::DeleteCustomer { dev, pick }),
        3 => (dev.clone(), 0..8usize, 0..100u8).prop_map(|(dev, pick, total)| Op::InsertInvoice { dev, pick, total }),
        2 => (dev.clone(), 0..8usize, 0..100u8).prop_map(|(dev, pick, total)| Op::UpdateInvoice { dev, pick, total }),
        1 => (dev.clone(), 0..8usize).prop_map(|(dev, pick)| Op::DeleteInvoice { dev, pick }),
        1 => dev.clone().prop_map(|dev| Op::Checkpoint { dev }),
        3 => (dev.clone(), fault).prop_map(|(dev, fault)| Op::Send { dev, fault }),
        2 => dev.clone().prop_map(|dev| Op::Receive { dev }),
        1 => dev.clone().prop_map(|dev| Op::Offline { dev }),
        1 => dev.clone().prop_map(|dev| Op::Reopen { dev }),
        1 => Just(Op::Quiesce),
    ]
}

/// An event as the model sees it.
#[derive(Debug, Clone)]
enum Ev {
    InsCust(String, String),
    UpdCust(String, String),
    DelCust(String),
    InsInv(String, String, String, i64),
    UpdInv(String, i64),
    DelInv(String),
}

#[derive(Debug, Default)]
struct Model {
    customers: BTreeMap<String, String>,
    /// tag → (customer name, user, total)
    invoices: BTreeMap<String, (String, String, i64)>,
    /// Failures the model predicts (for the summary).
    failures: usize,
}

impl Model {
    fn apply(&mut self, ev: Ev) {
        let ok = match ev {
            Ev::InsCust(name, city) => self.customers.insert(name, city).is_none(),
            Ev::UpdCust(name, city) => self.customers.get_mut(&name).map(|c| *c = city).is_some(),
            Ev::DelCust(name) => {
                !self.invoices.values().any(|(c, _, _)| *c == name) && self.customers.remove(&name).is_some()
            }
            Ev::InsInv(tag, customer, user, total) => {
                self.customers.contains_key(&customer) && self.invoices.insert(tag, (customer, user, total)).is_none()
            }
            Ev::UpdInv(tag, total) => self.invoices.get_mut(&tag).map(|i| i.2 = total).is_some(),
            Ev::DelInv(tag) => self.invoices.remove(&tag).is_some(),
        };
        if !ok {
            self.failures += 1;
        }
    }
}

const CUSTOMERS: &str = "SELECT CAST(id AS TEXT) || '|' || name || '|' || coalesce(city, '') FROM customer";
const INVOICES: &str = "SELECT CAST(id AS TEXT) || '|' || CAST(customer_id AS TEXT) || '|' || salesperson_id \
     || '|' || coalesce(created_at, '') || '|' || CAST(CAST(total AS INTEGER) AS TEXT) FROM invoice";
const MODEL_CUSTOMERS: &str = "SELECT name || '|' || coalesce(city, '') FROM customer";
const MODEL_INVOICES: &str = "SELECT i.created_at || '|' || coalesce(c.name, '?') || '|' || i.salesperson_id \
     || '|' || CAST(CAST(i.total AS INTEGER) AS TEXT) FROM invoice i LEFT JOIN customer c ON c.id = i.customer_id";
const ORPHANS: &str = "SELECT count(*) FROM invoice i LEFT JOIN customer c ON c.id = i.customer_id WHERE c.id IS NULL";
const TEMPORARY_KEYS: &str = "SELECT (SELECT count(*) FROM customer WHERE id < 0) + (SELECT count(*) FROM invoice WHERE id < 0 OR customer_id < 0)";

/// Totals of what the run exercised, for the summary line.
#[derive(Debug, Default)]
struct Totals {
    ops: AtomicUsize,
    quiescent_checks: AtomicUsize,
    faults: AtomicUsize,
    failed_events: AtomicUsize,
    predicted_failures: AtomicUsize,
}

struct Case<'a> {
    site: &'a Site,
    prefix: String,
    proxies: Vec<Proxy>,
    devices: Vec<Option<Client>>,
    pending: Vec<Vec<Ev>>,
    owned_customers: Vec<Vec<String>>,
    owned_invoices: Vec<Vec<String>>,
    /// Rows each device updated since its last completed send (see [`self_conflicts`]).
    dirty: Vec<std::collections::BTreeSet<String>>,
    model: Model,
    next: usize,
    totals: &'a Totals,
}

macro_rules! check {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

impl Case<'_> {
    fn config(&self, dev: usize, attempts: u32) -> ClientConfig {
        ClientConfig { max_attempts: attempts, ..self.site.config(&self.proxies[dev].url(), USERS[dev]) }
    }

    /// Opens device `dev` again (a new connection pool: the next request meets the next fault).
    fn reopen(&mut self, dev: usize, attempts: u32) {
        self.devices[dev] = None;
        let config = self.config(dev, attempts);
        self.devices[dev] = Some(self.site.device_with(&format!("{}-d{dev}", self.prefix), config));
    }

    fn dev(&self, dev: usize) -> &Client {
        self.devices[dev].as_ref().unwrap()
    }

    fn names(&self, dev: usize, sql: &str) -> Vec<String> {
        device_lines(self.dev(dev), sql)
    }

    fn present(&self, dev: usize, sql: &str, candidates: &[String]) -> Vec<String> {
        let here = self.names(dev, sql);
        candidates.iter().filter(|c| here.contains(c)).cloned().collect()
    }

    /// The server accepted everything device `dev` had: the model applies its events in order.
    fn applied(&mut self, dev: usize) {
        for ev in std::mem::take(&mut self.pending[dev]) {
            self.model.apply(ev);
        }
        self.dirty[dev].clear();
    }

    /// Candidates a second write may touch: without [`self_conflicts`], not rows updated since
    /// the last send.
    fn clean(&self, dev: usize, candidates: Vec<String>) -> Vec<String> {
        if self_conflicts() {
            return candidates;
        }
        candidates.into_iter().filter(|c| !self.dirty[dev].contains(c)).collect()
    }

    fn fresh(&mut self, kind: &str) -> String {
        self.next += 1;
        format!("{}{kind}{}", self.prefix, self.next)
    }

    /// Sends until done through a healthy proxy; the model applies the device's events.
    async fn send_all(&mut self, dev: usize) -> Result<(), String> {
        self.proxies[dev].clear();
        for _ in 0..5 {
            if self.dev(dev).send().await.is_ok() && unsent(self.dev(dev)) == 0 {
                self.applied(dev);
                return Ok(());
            }
            self.reopen(dev, 4);
        }
        Err(format!("d{dev}: send did not complete"))
    }

    async fn receive(&mut self, dev: usize) -> Result<(), String> {
        self.site.settle().await;
        match self.dev(dev).receive().await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("d{dev}: receive failed: {e}")),
        }
    }

    async fn run(&mut self, op: &Op) -> Result<(), String> {
        self.totals.ops.fetch_add(1, Ordering::Relaxed);
        match *op {
            Op::InsertCustomer { dev } => {
                let name = self.fresh("c");
                self.dev(dev)
                    .transaction(|tx| tx.execute("INSERT INTO customer (name, city) VALUES (?1, 'c0')", [&name]))
                    .map_err(|e| format!("local insert: {e}"))?;
                self.owned_customers[dev].push(name.clone());
                self.pending[dev].push(Ev::InsCust(name, "c0".into()));
            }
            Op::UpdateCustomer { dev, pick, city } => {
                let c = self.present(dev, "SELECT name FROM customer", &self.owned_customers[dev].clone());
                if let Some(name) = c.get(pick % c.len().max(1)) {
                    let city = format!("c{city}");
                    self.dev(dev)
                        .transaction(|tx| tx.execute("UPDATE customer SET city = ?1 WHERE name = ?2", [&city, name]))
                        .map_err(|e| format!("local update: {e}"))?;
                    self.dirty[dev].insert(name.clone());
                    self.pending[dev].push(Ev::UpdCust(name.clone(), city));
                }
            }
            Op::DeleteCustomer { dev, pick } => {
                // Only customers no local invoice references (the device's own FKs would refuse).
                let unreferenced = "SELECT name FROM customer c WHERE NOT EXISTS \
                                    (SELECT 1 FROM invoice i WHERE i.customer_id = c.id)";
                let c = self.present(dev, unreferenced, &self.owned_customers[dev].clone());
                let c = self.clean(dev, c);
                if let Some(name) = c.get(pick % c.len().max(1)) {
                    self.dev(dev)
                        .transaction(|tx| tx.execute("DELETE FROM customer WHERE name = ?1", [name]))
                        .map_err(|e| format!("local delete: {e}"))?;
                    self.pending[dev].push(Ev::DelCust(name.clone()));
                }
            }
            Op::InsertInvoice { dev, pick, total } => {
                let c = self.names(dev, "SELECT name FROM customer");
                if let Some(customer) = c.get(pick % c.len().max(1)).cloned() {
                    let tag = self.fresh("i");
                    let user = USERS[dev];
                    self.dev(dev)
                        .transaction(|tx| {
                            tx.execute(
                                "INSERT INTO invoice (customer_id, salesperson_id, created_at, total) \
                                 SELECT id, ?1, ?2, ?3 FROM customer WHERE name = ?4",
                                (user, &tag, f64::from(total), &customer),
                            )
                        })
                        .map_err(|e| format!("local insert: {e}"))?;
                    self.owned_invoices[dev].push(tag.clone());
                    self.pending[dev].push(Ev::InsInv(tag, customer, user.into(), i64::from(total)));
                }
            }
            Op::UpdateInvoice { dev, pick, total } => {
                let i = self.present(dev, "SELECT created_at FROM invoice", &self.owned_invoices[dev].clone());
                let i = self.clean(dev, i);
                if let Some(tag) = i.get(pick % i.len().max(1)) {
                    self.dirty[dev].insert(tag.clone());
                    self.dev(dev)
                        .transaction(|tx| {
                            tx.execute("UPDATE invoice SET total = ?1 WHERE created_at = ?2", (f64::from(total), tag))
                        })
                        .map_err(|e| format!("local update: {e}"))?;
                    self.pending[dev].push(Ev::UpdInv(tag.clone(), i64::from(total)));
                }
            }
            Op::DeleteInvoice { dev, pick } => {
                let i = self.present(dev, "SELECT created_at FROM invoice", &self.owned_invoices[dev].clone());
                let i = self.clean(dev, i);
                if let Some(tag) = i.get(pick % i.len().max(1)) {
                    self.dev(dev)
                        .transaction(|tx| tx.execute("DELETE FROM invoice WHERE created_at = ?1", [tag]))
                        .map_err(|e| format!("local delete: {e}"))?;
                    self.pending[dev].push(Ev::DelInv(tag.clone()));
                }
            }
            Op::Checkpoint { dev } => self.dev(dev).checkpoint().map_err(|e| format!("checkpoint: {e}"))?,
            Op::Send { dev, fault } => {
                self.reopen(dev, 4);
                let fault = match fault {
                    SendFault::None => None,
                    SendFault::DropResponse => Some(Fault::DropResponse),
                    SendFault::CutRequest(n) => Some(Fault::CutRequestAfter(n.into())),
                    SendFault::CutResponse(n) => Some(Fault::CutResponseAfter(n.into())),
                };
                let before = self.proxies[dev].stats().faults;
                if let Some(f) = fault {
                    self.proxies[dev].push_faults([f]);
                }
                let result = self.dev(dev).send().await;
                self.totals.faults.fetch_add((self.proxies[dev].stats().faults - before) as usize, Ordering::Relaxed);
                self.proxies[dev].clear();
                check!(result.is_ok(), "d{dev}: send through one {fault:?} failed: {result:?}");
                check!(unsent(self.dev(dev)) == 0, "d{dev}: events left unsent after a successful send");
                self.applied(dev);
            }
            Op::Receive { dev } => self.receive(dev).await?,
            Op::Offline { dev } => {
                self.reopen(dev, 1);
                self.proxies[dev].set_default(Fault::Refuse);
                let had_unsent = unsent(self.dev(dev)) > 0;
                let sent = self.dev(dev).send().await;
                let received = self.dev(dev).receive().await;
                self.totals.faults.fetch_add(1, Ordering::Relaxed);
                self.proxies[dev].clear();
                check!(!had_unsent || sent.is_err(), "d{dev}: a send succeeded while offline: {sent:?}");
                check!(received.is_err(), "d{dev}: a receive succeeded while offline: {received:?}");
            }
            Op::Reopen { dev } => self.reopen(dev, 4),
            Op::Quiesce => self.quiesce().await?,
        }
        Ok(())
    }

    async fn quiesce(&mut self) -> Result<(), String> {
        self.totals.quiescent_checks.fetch_add(1, Ordering::Relaxed);
        for dev in 0..DEVICES {
            self.send_all(dev).await?;
        }
        // Failed events carry their reasons; discarding them restores the server's rows.
        for dev in 0..DEVICES {
            for _ in 0..100 {
                let c = self.dev(dev);
                let mut failed = c.events(EventStatus::Rejected).map_err(|e| e.to_string())?;
                failed.extend(c.events(EventStatus::DependencyRejected).map_err(|e| e.to_string())?);
                let Some(first) = failed.first() else { break };
                for f in &failed {
                    check!(
                        f.failure_code.is_some() && f.failure_message.as_deref().is_some_and(|m| !m.is_empty()),
                        "d{dev}: a failed event without a reason: {f:?}"
                    );
                }
                self.totals.failed_events.fetch_add(1, Ordering::Relaxed);
                c.discard(first.seq).map_err(|e| format!("d{dev}: discard {first:?}: {e}"))?;
            }
        }
        for dev in 0..DEVICES {
            self.send_all(dev).await?;
        }
        for dev in 0..DEVICES {
            self.receive(dev).await?;
        }
        self.check().await
    }

    async fn check(&self) -> Result<(), String> {
        let db = &self.site.server.database;
        let model_customers: Vec<String> = self.model.customers.iter().map(|(n, c)| format!("{n}|{c}")).collect();
        let mut model_invoices: Vec<String> =
            self.model.invoices.iter().map(|(t, (c, u, total))| format!("{t}|{c}|{u}|{total}")).collect();
        model_invoices.sort();
        let server_customers = server_lines(db, MODEL_CUSTOMERS).await;
        check!(
            server_customers == model_customers,
            "server customers {server_customers:?} != model {model_customers:?}"
        );
        let server_invoices = server_lines(db, MODEL_INVOICES).await;
        check!(server_invoices == model_invoices, "server invoices {server_invoices:?} != model {model_invoices:?}");
        check!(self.site.server_i64(ORPHANS).await == 0, "a server invoice references a missing customer");
        check!(self.site.server_i64(TEMPORARY_KEYS).await == 0, "a temporary key on the server");
        let customers = server_lines(db, CUSTOMERS).await;
        for (dev, user) in USERS.iter().enumerate() {
            let c = self.dev(dev);
            let invoices = server_lines(db, &format!("{INVOICES} WHERE salesperson_id = '{user}'")).await;
            let local_customers = device_lines(c, CUSTOMERS);
            check!(local_customers == customers, "d{dev} customers {local_customers:?} != server {customers:?}");
            let local_invoices = device_lines(c, INVOICES);
            check!(
                local_invoices == invoices,
                "d{dev} invoices {local_invoices:?} != server's for {user} {invoices:?}"
            );
            check!(fk_violations(c) == 0 && local_i64(c, ORPHANS) == 0, "d{dev}: a foreign key dangles");
            check!(local_i64(c, TEMPORARY_KEYS) == 0, "d{dev}: a temporary key survived");
            let log = local_i64(c, "SELECT count(*) FROM ferry_log WHERE kind <> 'checkpoint'");
            check!(log == 0, "d{dev}: {log} events left in the pending log after discarding failures");
        }
        Ok(())
    }
}

async fn run_case(site: &Site, case: usize, ops: &[Op], totals: &Totals) -> Result<(), String> {
    // A clean server: previous cases' rows go (their devices are not used again).
    site.admin("DELETE FROM invoice_line").await;
    site.admin("DELETE FROM invoice").await;
    site.admin("DELETE FROM customer").await;
    let mut proxies = Vec::new();
    for _ in 0..DEVICES {
        proxies.push(Proxy::in_front_of(&site.server.url).await.map_err(|e| e.to_string())?);
    }
    let mut c = Case {
        site,
        prefix: format!("k{case}"),
        proxies,
        devices: (0..DEVICES).map(|_| None).collect(),
        pending: vec![Vec::new(); DEVICES],
        owned_customers: vec![Vec::new(); DEVICES],
        owned_invoices: vec![Vec::new(); DEVICES],
        dirty: vec![Default::default(); DEVICES],
        model: Model::default(),
        next: 0,
        totals,
    };
    for dev in 0..DEVICES {
        c.reopen(dev, 4);
    }
    for (i, op) in ops.iter().enumerate() {
        c.run(op).await.map_err(|e| format!("op #{i} {op:?}: {e}"))?;
    }
    let result = c.run(&Op::Quiesce).await.map_err(|e| format!("final quiescent point: {e}"));
    totals.predicted_failures.fetch_add(c.model.failures, Ordering::Relaxed);
    result
}

/// Whether a device may write again a row it updated since its last send. On by default (the
/// model found that such writes conflicted with the device's own earlier write; fixed since);
/// `FERRY_MODEL_SELF_CONFLICTS=0` leaves them out, to tell that case apart from others.
fn self_conflicts() -> bool {
    std::env::var("FERRY_MODEL_SELF_CONFLICTS").map_or(true, |v| v != "0")
}

fn env_usize(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

backend_tests! {
    async fn random_programs_match_the_model(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        let cases = env_usize("FERRY_MODEL_CASES", 8);
        let max_ops = env_usize("FERRY_MODEL_OPS", 30).max(1);
        let seed = std::env::var("FERRY_MODEL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(2_u64);
        let mut seed_bytes = [0u8; 32];
        for chunk in seed_bytes.chunks_mut(8) {
            chunk.copy_from_slice(&seed.to_le_bytes());
        }
        let config = Config { cases: cases as u32, max_shrink_iters: 64, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
        let handle = tokio::runtime::Handle::current();
        let counter = AtomicUsize::new(0);
        let totals = Totals::default();
        let started = std::time::Instant::now();
        let result = tokio::task::block_in_place(|| {
            runner.run(&proptest::collection::vec(op(), 1..=max_ops), |ops| {
                let case = counter.fetch_add(1, Ordering::SeqCst);
                handle.block_on(run_case(&site, case, &ops, &totals)).map_err(TestCaseError::fail)
            })
        });
        eprintln!(
            "model: {} runs ({cases} cases), {} ops, {} quiescent checks, {} faults, {} failed events discarded ({} predicted), seed {seed}, {:?}",
            counter.load(Ordering::SeqCst), totals.ops.load(Ordering::Relaxed), totals.quiescent_checks.load(Ordering::Relaxed),
            totals.faults.load(Ordering::Relaxed), totals.failed_events.load(Ordering::Relaxed),
            totals.predicted_failures.load(Ordering::Relaxed), started.elapsed()
        );
        match result {
            Ok(()) => {}
            Err(TestError::Fail(reason, ops)) => {
                panic!("FERRY_MODEL_SEED={seed}: {reason}\nminimal failing program ({} ops):\n{ops:#?}", ops.len())
            }
            Err(e) => panic!("FERRY_MODEL_SEED={seed}: {e}"),
        }
    }
}

use super::*;
use crate::layer::LoopLagLayer;
use tracing::Dispatch;
use tracing_subscriber::layer::SubscriberExt;

/// The tokens of the live roots whose span id is in `ids` (the tables are process-wide,
/// so look only at this test's spans).
fn live_tokens(ids: &[u64]) -> Vec<u64> {
    let mut tokens = Vec::new();
    roots().for_each_live(|root| {
        if ids.contains(&root.id) {
            tokens.push(root.token);
        }
    });
    tokens
}

fn span_ids(spans: &[tracing::Span]) -> Vec<u64> {
    spans
        .iter()
        .filter_map(|span| span.id().map(|id| id.into_u64()))
        .collect()
}

/// The calling thread's root table.
fn own_table() -> Option<Arc<Table>> {
    LOCAL
        .try_with(|local| local.table.get().cloned())
        .ok()
        .flatten()
}

fn listed(table: &Arc<Table>) -> bool {
    lock(&roots().tables)
        .list
        .iter()
        .any(|listed| Arc::ptr_eq(listed, table))
}

#[test]
fn closed_roots_go_dead_and_are_pruned_open_roots_stay() {
    let subscriber = tracing_subscriber::registry().with(LoopLagLayer::new(true));
    tracing::subscriber::with_default(subscriber, || {
        let open: Vec<_> = (0..10).map(|_| tracing::info_span!("open")).collect();
        let ids = span_ids(&open);
        for _ in 0..10 * Table::PRUNE_MIN {
            drop(tracing::info_span!("request"));
        }
        let child = tracing::info_span!(parent: &open[0], "child");
        let table = own_table().expect("the thread has a root table");
        assert!(listed(&table), "the thread's table is listed");
        let tracked = lock(&table.entries).roots.len();
        assert!(
            tracked <= Table::PRUNE_MIN,
            "closed roots are pruned: {tracked} entries"
        );
        let tokens = live_tokens(&ids);
        assert_eq!(
            tokens.len(),
            10,
            "open roots stay live, the child is no root"
        );
        drop(child);
        drop(open);
        assert!(
            live_tokens(&ids).is_empty(),
            "closing a root kills its entry"
        );
    });
}

#[test]
fn a_root_closed_on_another_thread_goes_when_its_creator_prunes() {
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(LoopLagLayer::new(true)));
    tracing::dispatcher::with_default(&dispatch, || {
        let moved = tracing::info_span!("moved");
        let ids = span_ids(std::slice::from_ref(&moved));
        let on_thread = dispatch.clone();
        std::thread::spawn(move || {
            tracing::dispatcher::with_default(&on_thread, || drop(moved));
        })
        .join()
        .expect("closing thread");
        assert_eq!(live_tokens(&ids).len(), 1, "stale until its creator prunes");
        let open: Vec<_> = (0..Index::PRUNE_MIN)
            .map(|_| tracing::info_span!("open"))
            .collect();
        assert!(
            live_tokens(&ids).is_empty(),
            "the creator's prune found its span closed"
        );
        assert_eq!(
            live_tokens(&span_ids(&open)).len(),
            Index::PRUNE_MIN,
            "open roots stay"
        );
    });
}

#[test]
fn a_root_closed_on_its_own_thread_is_marked_closed_at_once() {
    let subscriber = tracing_subscriber::registry().with(LoopLagLayer::new(true));
    tracing::subscriber::with_default(subscriber, || {
        let root = tracing::info_span!("request");
        let ids = span_ids(std::slice::from_ref(&root));
        let mut held = Vec::new();
        roots().for_each_live(|info| {
            if ids.contains(&info.id) {
                held.push(info);
            }
        });
        assert_eq!(held.len(), 1, "the root is tracked");
        assert!(!held[0].closed.load(Ordering::Acquire));
        drop(root);
        // Still reachable through the reference held here, but known closed.
        assert!(held[0].closed.load(Ordering::Acquire), "closed on close");
        let (victims, _) = roots().victims(held[0].created_on, u64::MAX, |_| false, 10);
        assert!(
            victims.iter().all(|root| root.token != held[0].token),
            "a closed root is never a victim"
        );
    });
}

#[test]
fn a_layer_without_victims_records_no_roots() {
    let off = tracing_subscriber::registry().with(LoopLagLayer::new(false));
    let ids = tracing::subscriber::with_default(off, || {
        let open: Vec<_> = (0..3).map(|_| tracing::info_span!("request")).collect();
        let ids = span_ids(&open);
        let tokens = live_tokens(&ids);
        drop(open);
        assert!(tokens.is_empty(), "no root recorded: {tokens:?}");
        ids
    });
    assert_eq!(ids.len(), 3, "the spans were created");
    let built = crate::LoopLag::builder()
        .max_victims(0)
        .build()
        .expect("max_victims(0) is accepted");
    let from_instance = tracing_subscriber::registry().with(built.layer());
    tracing::subscriber::with_default(from_instance, || {
        let open = tracing::info_span!("request");
        let tokens = live_tokens(&span_ids(std::slice::from_ref(&open)));
        assert!(tokens.is_empty(), "max_victims(0): no root recorded");
    });
    let on = tracing_subscriber::registry().with(LoopLagLayer::default());
    tracing::subscriber::with_default(on, || {
        let open = tracing::info_span!("request");
        let tokens = live_tokens(&span_ids(std::slice::from_ref(&open)));
        assert_eq!(tokens.len(), 1, "the default layer records the root");
    });
}

#[test]
fn roots_outlive_their_thread_and_its_table_goes_when_they_close() {
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(LoopLagLayer::new(true)));
    let on_thread = dispatch.clone();
    let (open, table) = std::thread::spawn(move || {
        tracing::dispatcher::with_default(&on_thread, || {
            let open: Vec<_> = (0..5).map(|_| tracing::info_span!("moved")).collect();
            drop(tracing::info_span!("closed"));
            let table = own_table().expect("the thread has a root table");
            (open, Arc::downgrade(&table))
        })
    })
    .join()
    .expect("root-creating thread");
    let ids = span_ids(&open);
    let alive = table.upgrade().expect("the exited thread's table is kept");
    assert!(
        alive.exited.load(Ordering::Acquire),
        "the thread has exited"
    );
    assert!(listed(&alive), "a table with open roots stays listed");
    assert_eq!(
        lock(&alive.entries).roots.len(),
        5,
        "the exiting thread pruned its closed root"
    );
    drop(alive);
    assert_eq!(live_tokens(&ids).len(), 5, "open roots stay visible");
    tracing::dispatcher::with_default(&dispatch, || drop(open));
    assert!(live_tokens(&ids).is_empty(), "closed roots are dead");
    assert!(
        table.upgrade().is_none(),
        "the table of an exited thread goes once its roots are closed"
    );
}

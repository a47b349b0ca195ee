//! Property tests of what clients send: query strings, Feathers queries, `/ws` frames and
//! socket.io events, through the same entry points as the fuzzers (`quill::fuzzing`), plus
//! the seed corpora in `fuzz/corpus`. Bad input must get a client error, never a panic or
//! a 500; a valid query must select exactly what a reference evaluation in PostgreSQL
//! selects. Seeded: `QUILL_PROP_SEED=<n>` replays a failure (its seed is printed).

use std::path::Path;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Map, Value, json};

use crate::support::Quill;
use quill::error::Result;

/// The seed of this run: `QUILL_PROP_SEED`, else a fresh one.
fn seed() -> u64 {
    match std::env::var("QUILL_PROP_SEED") {
        Ok(s) => s.parse().expect("QUILL_PROP_SEED must be a number"),
        Err(_) => {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).expect("random");
            u64::from_le_bytes(bytes)
        }
    }
}

fn runner(seed: u64, cases: u32) -> TestRunner {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &key),
    )
}

/// A client error (4xx), as every bad input must get.
fn client_error<T>(outcome: &Result<T>) -> bool {
    match outcome {
        Ok(_) => true,
        Err(e) => (400..500).contains(&e.status()),
    }
}

/// Runs a property; a failure names its seed.
fn check<S: Strategy>(name: &str, cases: u32, strategy: S, property: impl Fn(S::Value) -> bool)
where
    S::Value: std::fmt::Debug,
{
    let seed = seed();
    let outcome = runner(seed, cases).run(&strategy, |value| {
        prop_assert!(property(value));
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{name}: {e}\nreplay with QUILL_PROP_SEED={seed}");
    }
}

/// Keys a client might send: columns, operators, and nonsense.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "id",
            "text",
            "user_id",
            "created_at",
            "tags",
            "meta",
            "done",
            "score",
            "$in",
            "$nin",
            "$lt",
            "$lte",
            "$gt",
            "$gte",
            "$ne",
            "$or",
            "$and",
            "$sort",
            "$limit",
            "$skip",
            "$select",
            "$like",
            "nope",
            "",
        ])
        .prop_map(str::to_owned),
        "\\PC{0,8}",
    ]
}

/// Any JSON, biased towards query-shaped objects.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "1",
            "-1",
            "2026-01-01T00:00:00Z",
            "true",
            "{}",
            "{a,b}",
            "1e400",
            "NaN"
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..5)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

#[test]
fn any_query_string_gets_a_client_error_or_valid_sql() {
    let strategy = prop_oneof![
        "\\PC{0,80}",
        prop::collection::vec(("[a-z_$\\[\\]0-9]{0,16}", "[a-z0-9%\\-:.,{}]{0,10}"), 0..6).prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        }),
    ];
    check("query strings", 2000, strategy, |input: String| {
        let decoded = quill::transport::qs::decode(&input);
        client_error(&decoded) && decoded.map_or(true, |q| client_error(&quill::fuzzing::find(&q)))
    });
}

#[test]
fn any_feathers_query_gets_a_client_error_or_valid_sql() {
    check("feathers queries", 2000, json_value(), |query: Value| {
        let outcome = quill::fuzzing::find(&query);
        // Values are bound, never written into the SQL text.
        let bound = outcome.as_ref().map_or(true, |(sql, _)| !sql.contains('\''));
        client_error(&outcome) && bound
    });
}

#[test]
fn any_ws_frame_or_socketio_event_gets_a_client_error() {
    let frame = prop_oneof![
        "\\PC{0,60}",
        json_value().prop_map(|v| v.to_string()),
        (
            json_value(),
            prop::sample::select(vec!["find", "get", "create", "subscribe", "nope"]),
            json_value()
        )
            .prop_map(|(r, method, query)| {
                json!({"ref": r, "method": method, "service": "messages", "query": query}).to_string()
            }),
    ];
    check("ws frames", 1000, frame, |text: String| {
        client_error(&quill::fuzzing::ws_frame(&text))
    });
    let event = prop_oneof![
        "\\PC{0,60}",
        (
            prop::sample::select(vec!["find", "get", "create", "update", "patch", "remove", "nope"]),
            prop::collection::vec(json_value(), 0..5)
        )
            .prop_map(|(event, args)| {
                let mut all = vec![json!(event), json!("messages")];
                all.extend(args);
                Value::Array(all).to_string()
            }),
    ];
    check("socket.io events", 1000, event, |text: String| {
        client_error(&quill::fuzzing::socketio_event(&text))
    });
}

#[test]
fn the_fuzz_seed_corpora_get_client_errors_or_valid_sql() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut seen = 0;
    for (target, run) in [
        (
            "query_string",
            (|s: &str| quill::transport::qs::decode(s).and_then(|q| quill::fuzzing::find(&q).map(drop)))
                as fn(&str) -> Result<()>,
        ),
        ("feathers_query", |s: &str| match serde_json::from_str::<Value>(s) {
            Ok(q) => quill::fuzzing::find(&q).map(drop),
            Err(_) => Ok(()),
        }),
        ("ws_frame", quill::fuzzing::ws_frame),
        ("socketio_args", quill::fuzzing::socketio_event),
    ] {
        for entry in std::fs::read_dir(root.join(target)).expect("corpus directory") {
            let path = entry.expect("entry").path();
            let input = String::from_utf8_lossy(&std::fs::read(&path).expect("read")).into_owned();
            assert!(client_error(&run(&input)), "{}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 16, "the seed corpora are there ({seen} files)");
}

// --- Reference evaluation in PostgreSQL ---------------------------------------------

/// One condition on a column, as the test means it.
#[derive(Debug, Clone)]
enum Cond {
    Compare(&'static str, &'static str, Value),
    In(&'static str, bool, Vec<Value>),
    Null(&'static str, bool),
    Or(Vec<Vec<Cond>>),
}

fn column_value(column: &'static str) -> BoxedStrategy<Value> {
    match column {
        "id" => (0i64..45).prop_map(|n| json!(n)).boxed(),
        "user_id" => (0i64..5).prop_map(|n| json!(n)).boxed(),
        "text" => prop::sample::select(vec!["a", "b", "B", "ab", "a b", "é", "z", "", "10", "9"])
            .prop_map(|s| json!(s))
            .boxed(),
        _ => (0i64..6)
            .prop_map(|d| json!(format!("2026-03-0{}T12:00:00Z", d + 1)))
            .boxed(),
    }
}

fn condition() -> impl Strategy<Value = Cond> {
    conditions(false)
}

/// Conditions of `find` (any column, any operator), or of subscriptions: no timestamps,
/// and text by equality only (see `service::matching`).
fn conditions(subscription: bool) -> impl Strategy<Value = Cond> {
    let columns = if subscription {
        vec!["id", "user_id", "text"]
    } else {
        vec!["id", "user_id", "text", "created_at"]
    };
    let column = prop::sample::select(columns);
    let atom = prop_oneof![
        4 => (column.clone(), prop::sample::select(vec!["$eq", "$ne", "$lt", "$lte", "$gt", "$gte"]))
            .prop_map(move |(c, op)| if subscription && c == "text" && !matches!(op, "$eq" | "$ne") { (c, "$ne") } else { (c, op) })
            .prop_flat_map(|(c, op)| column_value(c).prop_map(move |v| Cond::Compare(c, op, v))),
        2 => (column, any::<bool>())
            .prop_flat_map(|(c, negated)| prop::collection::vec(column_value(c), 0..4).prop_map(move |vs| Cond::In(c, negated, vs))),
        1 => any::<bool>().prop_map(|negated| Cond::Null("user_id", negated)),
    ];
    atom.prop_recursive(2, 12, 3, |inner| {
        prop::collection::vec(prop::collection::vec(inner, 1..3), 1..3).prop_map(Cond::Or)
    })
}

/// The Feathers query for a conjunction of conditions.
fn feathers(conds: &[Cond]) -> Map<String, Value> {
    let mut query = Map::new();
    let mut ors = Vec::new();
    for cond in conds {
        // One key per condition: a second condition on a column goes into an $and branch.
        let (column, value) = match cond {
            Cond::Compare(c, "$eq", v) => (*c, v.clone()),
            Cond::Compare(c, op, v) => (*c, json!({ *op: v })),
            Cond::In(c, negated, vs) => (*c, json!({ if *negated { "$nin" } else { "$in" }: vs })),
            Cond::Null(c, false) => (*c, Value::Null),
            Cond::Null(c, true) => (*c, json!({"$ne": null})),
            Cond::Or(branches) => {
                ors.push(json!({"$or": branches.iter().map(|b| Value::Object(feathers(b))).collect::<Vec<_>>()}));
                continue;
            }
        };
        if query.contains_key(column) {
            ors.push(json!({ column: value }));
        } else {
            query.insert(column.to_owned(), value);
        }
    }
    if !ors.is_empty() {
        query.insert("$and".into(), Value::Array(ors));
    }
    query
}

fn literal(column: &str, value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let quoted = format!("'{}'", text.replace('\'', "''"));
    match column {
        "created_at" => format!("{quoted}::timestamptz"),
        "text" => quoted,
        _ => format!("{quoted}::bigint"),
    }
}

/// The same conditions written as SQL by hand, with literals: the reference.
fn reference_sql(conds: &[Cond]) -> String {
    if conds.is_empty() {
        return "TRUE".into();
    }
    let parts: Vec<String> = conds
        .iter()
        .map(|cond| match cond {
            Cond::Compare(c, op, v) => {
                let op = match *op {
                    "$eq" => "=",
                    "$ne" => "IS DISTINCT FROM",
                    "$lt" => "<",
                    "$lte" => "<=",
                    "$gt" => ">",
                    _ => ">=",
                };
                format!("({c} {op} {})", literal(c, v))
            }
            Cond::In(_, negated, vs) if vs.is_empty() => if *negated { "TRUE" } else { "FALSE" }.into(),
            Cond::In(c, negated, vs) => {
                let list: Vec<String> = vs.iter().map(|v| literal(c, v)).collect();
                let not = if *negated { "NOT " } else { "" };
                format!("({c} {not}IN ({}))", list.join(", "))
            }
            Cond::Null(c, negated) => format!("({c} IS {}NULL)", if *negated { "NOT " } else { "" }),
            Cond::Or(branches) => {
                let any: Vec<String> = branches.iter().map(|b| reference_sql(b)).collect();
                format!("({})", any.join(" OR "))
            }
        })
        .collect();
    parts.join(" AND ")
}

/// 40 messages over 4 users (every fifth without one), ten texts, six days.
async fn seed_messages(sql: &sqlx::PgPool) {
    sqlx::raw_sql(
        "INSERT INTO users (email, password) SELECT 'u' || i || '@x.io', 'x' FROM generate_series(1, 4) i;
         INSERT INTO messages (text, user_id, created_at)
         SELECT (ARRAY['a','b','B','ab','a b','é','z','','10','9'])[1 + i % 10],
                CASE WHEN i % 5 = 0 THEN NULL ELSE 1 + i % 4 END,
                timestamptz '2026-03-01T12:00:00Z' + (i % 6) * interval '1 day' + (i % 3) * interval '1 hour'
         FROM generate_series(1, 40) i;",
    )
    .execute(sql)
    .await
    .expect("seed rows");
}

/// The ids PostgreSQL selects for the conditions written by hand, and that SQL.
async fn reference_ids(sql: &sqlx::PgPool, conds: &[Cond]) -> (String, Vec<i64>) {
    let where_clause = reference_sql(conds);
    let ids = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM messages WHERE {where_clause} ORDER BY id"
    )))
    .fetch_all(sql)
    .await
    .unwrap_or_else(|e| panic!("reference {where_clause}: {e}"));
    (where_clause, ids)
}

#[tokio::test]
async fn a_valid_query_selects_exactly_what_postgresql_selects_by_reference() {
    const CASES: usize = 300;
    let seed = seed();
    let q = Quill::start().await;
    let sql = q.sql().await;
    seed_messages(&sql).await;
    let mut ws = q.ws().await;
    let mut runner = runner(seed, CASES as u32);
    let strategy = prop::collection::vec(condition(), 0..4);
    // Cases whose answer is neither nothing nor everything: the ones that test something.
    let mut telling = 0;
    for case in 0..CASES {
        let conds = strategy.new_tree(&mut runner).expect("a case").current();
        let mut query = feathers(&conds);
        query.insert("$sort".into(), json!({"id": 1}));
        query.insert("$limit".into(), json!(100));
        let reply = ws.call("find", "messages", json!({ "query": query })).await;
        let got: Vec<i64> = reply["result"]["data"]
            .as_array()
            .unwrap_or_else(|| panic!("case {case} {query:?}: {reply}\nreplay with QUILL_PROP_SEED={seed}"))
            .iter()
            .filter_map(|row| row["id"].as_i64())
            .collect();
        let (where_clause, expected) = reference_ids(&sql, &conds).await;
        assert_eq!(
            got, expected,
            "case {case}: {query:?}\nreference: {where_clause}\nreplay with QUILL_PROP_SEED={seed}"
        );
        telling += usize::from(!expected.is_empty() && expected.len() < 40);
    }
    assert!(
        telling >= CASES / 4,
        "only {telling} of {CASES} cases select some rows but not all (seed {seed})"
    );
}

#[tokio::test]
async fn the_subscription_matcher_decides_as_postgresql_does() {
    const CASES: usize = 300;
    let seed = seed();
    let q = Quill::start().await;
    let sql = q.sql().await;
    seed_messages(&sql).await;
    let rows: Vec<Value> =
        sqlx::query_scalar::<_, sqlx::types::Json<Value>>("SELECT row_to_json(m) FROM messages m ORDER BY id")
            .fetch_all(&sql)
            .await
            .expect("rows")
            .into_iter()
            .map(|r| r.0)
            .collect();
    let table = quill::store::Table::load(&sql, "messages", "public", "messages", "id", &[])
        .await
        .expect("catalog");
    let mut runner = runner(seed, CASES as u32);
    let strategy = prop::collection::vec(conditions(true), 0..4);
    for case in 0..CASES {
        let conds = strategy.new_tree(&mut runner).expect("a case").current();
        let query = Value::Object(feathers(&conds));
        let parsed = quill::service::query::Query::parse(&query, &table).expect("valid");
        parsed
            .check_matchable()
            .unwrap_or_else(|e| panic!("case {case}: {query} refused: {e}"));
        let got: Vec<i64> = rows
            .iter()
            .filter(|row| parsed.matches(row))
            .filter_map(|row| row["id"].as_i64())
            .collect();
        let (where_clause, expected) = reference_ids(&sql, &conds).await;
        assert_eq!(
            got, expected,
            "case {case}: {query}\nreference: {where_clause}\nreplay with QUILL_PROP_SEED={seed}"
        );
    }
    // And what it cannot decide as PostgreSQL would, a subscription refuses.
    let mut ws = q.ws().await;
    for query in [
        json!({"text": {"$gt": "a"}}),
        json!({"created_at": {"$lt": "2026-03-02T00:00:00Z"}}),
        json!({"created_at": "2026-03-02T12:00:00Z"}),
        json!({"user_id": "not a number"}),
    ] {
        let reply = ws.call("subscribe", "messages", json!({ "query": query })).await;
        assert_eq!(reply["error"]["code"], 400, "{query}: {reply}");
    }
}

/// Values of the typed table's columns, as a client might write them.
fn typed_value(column: &'static str) -> BoxedStrategy<String> {
    let pick = |values: Vec<&'static str>| prop::sample::select(values).prop_map(str::to_owned).boxed();
    match column {
        "i" => pick(vec!["0", "1", "-2", " 10", "2147483647", "-2147483648"]),
        "s" => pick(vec!["0", "1", "-2", "10 ", "32767"]),
        "d" => pick(vec!["0", "0.5", "0.1", "-1.25", "3", "1e1", "1E-1"]),
        "b" => pick(vec!["true", "false", "t", "f", "yes", "no", "1", "0", " TRUE "]),
        _ => pick(vec![
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
            "00000000-0000-0000-0000-000000000001",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
        ]),
    }
}

#[tokio::test]
async fn the_subscription_matcher_compares_integers_doubles_booleans_and_uuids_as_postgresql_does() {
    const CASES: usize = 300;
    let seed = seed();
    let q = Quill::start().await;
    let sql = q.sql().await;
    sqlx::raw_sql(
        "CREATE TABLE typed (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, i integer, s smallint,
                             d double precision, b boolean, u uuid, n numeric, r real, v varchar(3));
         INSERT INTO typed (i, s, d, b, u)
         SELECT (ARRAY[0, 1, -2, 10, 2147483647, NULL])[1 + i % 6],
                (ARRAY[0, 1, -2, 10, 32767, NULL]::smallint[])[1 + i % 6],
                (ARRAY[0, 0.5, 0.1, -1.25, 10, 'NaN', 'Infinity', NULL]::double precision[])[1 + i % 8],
                (ARRAY[true, false, NULL])[1 + i % 3],
                (ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '00000000-0000-0000-0000-000000000001',
                       'ffffffff-ffff-ffff-ffff-ffffffffffff', NULL]::uuid[])[1 + i % 4]
         FROM generate_series(1, 60) i;",
    )
    .execute(&sql)
    .await
    .expect("typed table");
    let table = quill::store::Table::load(&sql, "typed", "public", "typed", "id", &[])
        .await
        .expect("catalog");
    let rows: Vec<Value> = sqlx::query_scalar::<_, sqlx::types::Json<Value>>("SELECT row_to_json(t) FROM typed t")
        .fetch_all(&sql)
        .await
        .expect("rows")
        .into_iter()
        .map(|r| r.0)
        .collect();
    let sql_type = |c: &str| match c {
        "i" => "integer",
        "s" => "smallint",
        "d" => "double precision",
        "b" => "boolean",
        _ => "uuid",
    };
    let mut runner = runner(seed, CASES as u32);
    let atom = (
        prop::sample::select(vec!["i", "s", "d", "b", "u"]),
        prop::sample::select(vec!["=", "$ne", "$lt", "$lte", "$gt", "$gte", "$in", "$nin"]),
    )
        .prop_flat_map(|(c, op)| prop::collection::vec(typed_value(c), 1..3).prop_map(move |vs| (c, op, vs)));
    let strategy = prop::collection::vec(atom, 1..3);
    for case in 0..CASES {
        let atoms = strategy.new_tree(&mut runner).expect("a case").current();
        let mut branches = Vec::new();
        let mut clauses = Vec::new();
        for (column, op, values) in &atoms {
            let literal = |v: &String| format!("'{}'::{}", v.replace('\'', "''"), sql_type(column));
            let (feathers, clause) = match *op {
                "=" => (
                    json!({ *column: values[0] }),
                    format!("{column} = {}", literal(&values[0])),
                ),
                "$in" | "$nin" => {
                    let list: Vec<String> = values.iter().map(literal).collect();
                    let not = if *op == "$nin" { "NOT " } else { "" };
                    (
                        json!({ *column: { *op: values } }),
                        format!("{column} {not}IN ({})", list.join(", ")),
                    )
                }
                other => {
                    let sql_op = match other {
                        "$ne" => "IS DISTINCT FROM",
                        "$lt" => "<",
                        "$lte" => "<=",
                        "$gt" => ">",
                        _ => ">=",
                    };
                    (
                        json!({ *column: { other: values[0] } }),
                        format!("{column} {sql_op} {}", literal(&values[0])),
                    )
                }
            };
            branches.push(feathers);
            clauses.push(format!("({clause})"));
        }
        let query = json!({ "$and": branches });
        let parsed = quill::service::query::Query::parse(&query, &table).expect("valid");
        parsed
            .check_matchable()
            .unwrap_or_else(|e| panic!("case {case}: {query} refused: {e}"));
        let mut got: Vec<i64> = rows
            .iter()
            .filter(|row| parsed.matches(row))
            .filter_map(|row| row["id"].as_i64())
            .collect();
        got.sort_unstable();
        let where_clause = clauses.join(" AND ");
        let expected: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM typed WHERE {where_clause} ORDER BY id"
        )))
        .fetch_all(&sql)
        .await
        .unwrap_or_else(|e| panic!("reference {where_clause}: {e}"));
        assert_eq!(
            got, expected,
            "case {case}: {query}\nreference: {where_clause}\nreplay with QUILL_PROP_SEED={seed}"
        );
    }
    // What the matcher cannot decide as PostgreSQL would is refused, not answered.
    for query in [
        json!({"n": 1}),
        json!({"r": 0.5}),
        json!({"v": "abc"}),
        json!({"i": 3000000000i64}),
        json!({"s": 40000}),
        json!({"d": "1e-400"}),
        json!({"d": "NaN"}),
        json!({"u": " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}),
        json!({"u": "{{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}}"}),
        json!({"b": "tr"}),
    ] {
        let parsed = quill::service::query::Query::parse(&query, &table).expect("parses");
        assert!(parsed.check_matchable().is_err(), "{query} must be refused");
    }
}

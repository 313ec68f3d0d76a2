//! The result table (stdout) and its JSON twin.

use std::time::Duration;

use serde_json::{Value, json};

pub use crate::common::percentile;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One line: a figure of ours next to its reference.
pub struct Row {
    pub scenario: &'static str,
    pub measure: String,
    pub ours: String,
    pub reference: String,
    pub ratio: String,
    pub goal: String,
    pub met: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn row(
        &mut self,
        scenario: &'static str,
        measure: impl Into<String>,
        ours: impl Into<String>,
        reference: impl Into<String>,
    ) -> &mut Row {
        self.rows.push(Row {
            scenario,
            measure: measure.into(),
            ours: ours.into(),
            reference: reference.into(),
            ratio: String::new(),
            goal: String::new(),
            met: None,
        });
        self.rows.last_mut().unwrap()
    }

    pub fn note(&mut self, n: impl Into<String>) {
        let n = n.into();
        eprintln!("bench: {n}");
        self.notes.push(n);
    }

    pub fn print(&self, title: &str) {
        let w = [12usize, 50, 16, 26, 8, 24];
        let line = "-".repeat(w.iter().sum::<usize>() + 2 * w.len());
        println!();
        println!("{title}");
        println!("{line}");
        println!(
            "{:<12}  {:<50}  {:>16}  {:>26}  {:>8}  {:<24}",
            "scenario", "measure", "slipstream", "reference", "ratio", "goal"
        );
        println!("{line}");
        let mut last = "";
        for r in &self.rows {
            let scen = if r.scenario == last { "" } else { r.scenario };
            last = r.scenario;
            let goal = match r.met {
                Some(true) => format!("{} ok", r.goal),
                Some(false) => format!("{} MISSED", r.goal),
                None => r.goal.clone(),
            };
            println!(
                "{:<12}  {:<50}  {:>16}  {:>26}  {:>8}  {:<24}",
                scen, r.measure, r.ours, r.reference, r.ratio, goal
            );
        }
        println!("{line}");
        for n in &self.notes {
            println!("* {n}");
        }
    }

    pub fn json(&self, params: Value, raw: Value) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "scenario": r.scenario, "measure": r.measure, "slipstream": r.ours,
                    "reference": r.reference, "ratio": r.ratio, "goal": r.goal, "met": r.met,
                })
            })
            .collect();
        json!({ "params": params, "rows": rows, "figures": raw, "notes": self.notes })
    }
}

impl Row {
    pub fn ratio(&mut self, r: f64) -> &mut Self {
        self.ratio = if r.is_finite() {
            format!("{r:.2}")
        } else {
            "-".into()
        };
        self
    }

    pub fn goal(&mut self, goal: impl Into<String>, met: bool) -> &mut Self {
        self.goal = goal.into();
        self.met = Some(met);
        self
    }
}

/// Prints two runs' JSON (for example the real server's and the
/// emulator's) side by side: our figure of each, row by row.
pub fn compare(a: &std::path::Path, b: &std::path::Path) {
    let load = |p: &std::path::Path| -> Value {
        let text = std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
    };
    let (ja, jb) = (load(a), load(b));
    let name = |j: &Value| {
        let server = j["params"]["apiserver"].as_str().unwrap_or("?").to_owned();
        let size = j["params"]["bindings"].as_u64().unwrap_or(0);
        format!("{server} ({size} bindings)")
    };
    let rows = |j: &Value| j["rows"].as_array().cloned().unwrap_or_default();
    let (ra, rb) = (rows(&ja), rows(&jb));
    let cell = |r: Option<&Value>| -> String {
        let Some(r) = r else { return "-".into() };
        let met = match r["met"].as_bool() {
            Some(true) => " ok",
            Some(false) => " MISSED",
            None => "",
        };
        format!("{}{met}", r["slipstream"].as_str().unwrap_or(""))
    };
    println!(
        "| scenario | measure | {} | {} |\n|---|---|---|---|",
        name(&ja),
        name(&jb)
    );
    for (i, r) in ra.iter().enumerate() {
        let other = rb.get(i).filter(|o| o["scenario"] == r["scenario"]);
        println!(
            "| {} | {} | {} | {} |",
            r["scenario"].as_str().unwrap_or(""),
            r["measure"].as_str().unwrap_or(""),
            cell(Some(r)),
            cell(other)
        );
    }
}

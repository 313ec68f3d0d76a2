//! Bindings an older or hand-edited CRD lets into the API: the operator's
//! own checks, not the schema, keep them from syncing, and one it cannot
//! even read does not hold up the others.

/// Emulator only: a loose CRD would loosen the real control plane every
/// test of this binary shares.
mod emulator_only {
    use kube::{
        Api,
        api::{ApiResource, DynamicObject, PostParams},
    };
    use slipstream::crd::ConfigBinding;

    use crate::*;

    fn raw_bindings(env: &Env) -> Api<DynamicObject> {
        let ar = ApiResource::erase::<ConfigBinding>(&());
        Api::namespaced_with(env.client.clone(), env.ns(), &ar)
    }

    async fn create_raw(env: &Env, name: &str, spec: serde_json::Value) {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "slipstream.io/v1alpha1",
            "kind": "ConfigBinding",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .unwrap();
        raw_bindings(env)
            .create(&PostParams::default(), &obj)
            .await
            .unwrap();
    }

    /// Waits until the raw object's Ready condition has `reason`; returns
    /// its message.
    async fn wait_raw_reason(env: &Env, name: &str, reason: &str) -> String {
        eventually(&format!("{name} reason {reason}"), || async {
            let obj = raw_bindings(env).get(name).await.ok()?;
            let conditions = obj.data["status"]["conditions"].as_array()?.clone();
            let ready = conditions.iter().find(|c| c["type"] == "Ready")?;
            (ready["reason"] == reason && ready["status"] == "False")
                .then(|| ready["message"].as_str().unwrap_or_default().to_owned())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bindings_that_do_not_deserialize_are_reported_and_the_others_sync() {
        let env = Scenario::new().loose_crd().start().await;
        let kv = env.bucket("app").await;
        put(&kv, "g.a", "1").await;
        // present before the operator starts: its first list holds them
        create_raw(
            &env,
            "string-prefixes",
            serde_json::json!({"bucket": "app", "prefixes": "g."}),
        )
        .await;
        create_raw(
            &env,
            "bogus-policy",
            serde_json::json!({"bucket": "app", "prefixes": ["g."], "keyPolicy": "Bogus"}),
        )
        .await;
        env.create_binding("good", "bucket: app\nprefixes: [g.]")
            .await;
        let _op = env.operator();
        wait_data(&env, "good", &map(&[("g.a", "1")])).await;
        for bad in ["string-prefixes", "bogus-policy"] {
            let message = wait_raw_reason(&env, bad, "InvalidSpec").await;
            assert!(message.contains("schema"), "{bad}: {message}");
            wait_event(&env, bad, "InvalidSpec").await;
            assert!(env.cm(bad).await.is_none(), "{bad} wrote nothing");
        }

        // while running: a new bad one, then a new good one
        create_raw(
            &env,
            "late-bad",
            serde_json::json!({"bucket": "app", "prefixes": 7}),
        )
        .await;
        env.create_binding("late-good", "bucket: app\nprefixes: [g.]")
            .await;
        wait_data(&env, "late-good", &map(&[("g.a", "1")])).await;
        wait_raw_reason(&env, "late-bad", "InvalidSpec").await;
        put(&kv, "g.b", "2").await;
        for good in ["good", "late-good"] {
            wait_data(&env, good, &map(&[("g.a", "1"), ("g.b", "2")])).await;
        }
    }

    /// What the schema refuses (a bucket name with a dot, no prefixes)
    /// reaches the operator when the schema is loose: its own checks name it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_bucket_name_zero_and_duplicate_prefixes_reach_the_operators_own_checks() {
        let env = Scenario::new().loose_crd().start().await;
        let _op = env.operator();
        for (name, yaml, reason) in [
            (
                "badbucket",
                "bucket: 'no.dots'\nprefixes: [k.]",
                "InvalidBucketName",
            ),
            ("noprefix", "bucket: app\nprefixes: []", "InvalidPrefixes"),
            ("dup", "bucket: app\nprefixes: [k., k.]", "InvalidPrefixes"),
        ] {
            env.create_binding(name, yaml).await;
            let b = wait_reason(&env, name, reason).await;
            let status = b.status.unwrap();
            assert_eq!(
                status.condition("Stalled").unwrap().status,
                "True",
                "{name}"
            );
            wait_event(&env, name, reason).await;
            assert!(env.cm(name).await.is_none(), "{name} wrote nothing");
        }
    }
}

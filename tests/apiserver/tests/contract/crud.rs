//! Create / get / list / update rules (API concepts: "Resource versions",
//! "Efficient detection of changes"; api-conventions: "Concurrency Control and
//! Consistency", "Idempotency" for generateName).

use k8s_openapi::api::{
    coordination::v1::{Lease, LeaseSpec},
    core::v1::{Event, ObjectReference},
    events::v1::Event as EventV1,
};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};

use super::*;

#[tokio::test]
async fn create_stamps_uid_creation_timestamp_and_one_global_increasing_resource_version() {
    let (_api, client) = start_with_crd().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let a = cms
        .create(&PostParams::default(), &cm("a", &[("k", "v")]))
        .await
        .unwrap();
    let w = widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();
    let b = cms
        .create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    assert!(
        rv_of(&a.metadata) < rv_of(&w.metadata) && rv_of(&w.metadata) < rv_of(&b.metadata),
        "one counter across resources"
    );
    assert_eq!(a.metadata.uid.as_ref().unwrap().len(), 36);
    assert_ne!(a.metadata.uid, b.metadata.uid);
    assert!(a.metadata.creation_timestamp.is_some());
    // Custom resources start at generation 1; ConfigMaps carry no generation.
    assert_eq!(w.metadata.generation, Some(1));
    assert_eq!(a.metadata.generation, None);

    // A list carries the list resourceVersion: the store's current one,
    // so at least that of the last write.
    let list = cms.list(&ListParams::default()).await.unwrap();
    let list_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert!(list_rv >= rv_of(&b.metadata), "{list_rv}");
    assert_eq!(list.items.len(), 2);
}

#[tokio::test]
async fn create_of_an_existing_name_is_409_already_exists() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &cm("dup", &[]))
        .await
        .unwrap();
    let s = api_err(cms.create(&PostParams::default(), &cm("dup", &[])).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(s.message, "configmaps \"dup\" already exists");
}

#[tokio::test]
async fn create_in_a_missing_namespace_is_404_not_found() {
    let (_api, client) = start().await;
    let nope = unique("nope");
    let cms: Api<ConfigMap> = Api::namespaced(client, &nope);
    let s = api_err(cms.create(&PostParams::default(), &cm("x", &[])).await);
    assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
    assert_eq!(s.message, format!("namespaces \"{nope}\" not found"));
}

#[tokio::test]
async fn get_of_a_missing_object_is_404_not_found_status() {
    let (_api, client) = start_with_crd().await;
    let s = api_err(
        Api::<ConfigMap>::default_namespaced(client.clone())
            .get("missing")
            .await,
    );
    assert_eq!(
        (s.code, s.reason.as_str(), s.message.as_str()),
        (404, "NotFound", "configmaps \"missing\" not found")
    );
    let s = api_err(
        Api::<Widget>::default_namespaced(client)
            .get("missing")
            .await,
    );
    assert_eq!(
        s.message,
        "widgets.test.slipstream.io \"missing\" not found"
    );
    assert_eq!(s.details.unwrap().group, "test.slipstream.io");
}

#[tokio::test]
async fn generate_name_gets_a_random_five_character_suffix() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let mut c = cm("", &[]);
    c.metadata.name = None;
    c.metadata.generate_name = Some("gen-".into());
    let a = cms.create(&PostParams::default(), &c).await.unwrap();
    let b = cms.create(&PostParams::default(), &c).await.unwrap();
    let (an, bn) = (a.metadata.name.unwrap(), b.metadata.name.unwrap());
    assert!(an.starts_with("gen-") && an.len() == 9, "{an}");
    assert_ne!(an, bn);
}

#[tokio::test]
async fn update_with_a_stale_resource_version_is_409_conflict_and_without_one_is_unconditional() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let v1 = cms
        .create(&PostParams::default(), &cm("u", &[("a", "1")]))
        .await
        .unwrap();
    let mut v2 = v1.clone();
    v2.data = Some([("a".to_string(), "2".to_string())].into());
    let v2 = cms.replace("u", &PostParams::default(), &v2).await.unwrap();
    assert!(rv_of(&v2.metadata) > rv_of(&v1.metadata));

    let mut stale = v1.clone();
    stale.data = Some([("a".to_string(), "3".to_string())].into());
    let s = api_err(cms.replace("u", &PostParams::default(), &stale).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert!(
        s.message.contains("the object has been modified"),
        "{}",
        s.message
    );

    stale.metadata.resource_version = None;
    let v3 = cms
        .replace("u", &PostParams::default(), &stale)
        .await
        .unwrap();
    assert_eq!(v3.data.unwrap()["a"], "3");

    // PUT of a missing ConfigMap does not create it.
    let s = api_err(
        cms.replace("missing", &PostParams::default(), &cm("missing", &[]))
            .await,
    );
    assert_eq!(s.code, 404);
}

#[tokio::test]
async fn list_pages_with_limit_and_continue() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("p{i}"), &[]))
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(2);
    let mut pages = 0;
    loop {
        let page = cms.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(|c| c.metadata.name.clone().unwrap()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = ListParams::default().limit(2).continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4"]);
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists_with_all_operators() {
    let (api, client) = start().await;
    let other = unique("other");
    create_namespace(&client, &other).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for (name, labels) in [
        ("a", vec![("app", "web"), ("tier", "front")]),
        ("b", vec![("app", "api")]),
        ("c", vec![]),
    ] {
        let mut c = cm(name, &[]);
        c.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        cms.create(&PostParams::default(), &c).await.unwrap();
    }
    // In another namespace, under a name no other test uses (the real
    // server's tests share one cluster, and these lists span namespaces).
    let a = unique("a");
    for ns in [api.namespace(), other.as_str()] {
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &cm(&a, &[]))
            .await
            .unwrap();
    }
    let names = |l: kube::core::ObjectList<ConfigMap>| {
        l.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    let cases: [(&str, &[&str]); 7] = [
        ("app=web", &["a"]),
        ("app!=web", &[a.as_str(), "b", "c"]),
        ("app in (web,api)", &["a", "b"]),
        ("app notin (web)", &[a.as_str(), "b", "c"]),
        ("tier", &["a"]),
        ("!app", &[a.as_str(), "c"]),
        ("app,!tier", &["b"]),
    ];
    for (sel, want) in cases {
        assert_eq!(
            names(cms.list(&ListParams::default().labels(sel)).await.unwrap()),
            want,
            "{sel}"
        );
    }
    let all: Api<ConfigMap> = Api::all(client.clone());
    let across = |fields: String| {
        let all = all.clone();
        async move {
            all.list(&ListParams::default().fields(&fields))
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|c| c.metadata.namespace.unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(across(format!("metadata.name={a}")).await.len(), 2);
    assert_eq!(
        across(format!("metadata.name={a},metadata.namespace={other}")).await,
        [other.as_str()]
    );
    assert_eq!(
        across(format!(
            "metadata.name={a},metadata.namespace!={}",
            api.namespace()
        ))
        .await,
        [other.as_str()]
    );
    let s = api_err(cms.list(&ListParams::default().fields("data.x=1")).await);
    assert_eq!((s.code, s.reason.as_str()), (400, "BadRequest"));
}

#[tokio::test]
async fn events_in_both_groups_and_leases_round_trip() {
    let (api, client) = start().await;
    let events: Api<Event> = Api::default_namespaced(client.clone());
    let mut e = Event {
        metadata: ObjectMeta {
            name: Some("cm.1".into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            kind: Some("ConfigMap".into()),
            name: Some("x".into()),
            namespace: Some("elsewhere".into()),
            ..Default::default()
        },
        reason: Some("Synced".into()),
        type_: Some("Normal".into()),
        ..Default::default()
    };
    // A core/v1 Event is about an object in its own namespace.
    let s = api_err(events.create(&PostParams::default(), &e).await);
    assert_eq!(
        (s.code, s.message.as_str()),
        (
            422,
            "Event \"cm.1\" is invalid: involvedObject.namespace: Invalid value: \"elsewhere\": does not match event.namespace"
        )
    );
    e.involved_object.namespace = Some(api.namespace().into());
    events.create(&PostParams::default(), &e).await.unwrap();
    let found = events
        .list(&ListParams::default().fields("involvedObject.name=x,reason=Synced"))
        .await
        .unwrap();
    assert_eq!(found.items.len(), 1);

    let ev1: Api<EventV1> = Api::default_namespaced(client.clone());
    let e1 = EventV1 {
        metadata: ObjectMeta {
            name: Some("e1".into()),
            ..Default::default()
        },
        event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now(),
        )),
        regarding: Some(ObjectReference {
            kind: Some("ConfigMap".into()),
            name: Some("x".into()),
            namespace: Some(api.namespace().into()),
            ..Default::default()
        }),
        reporting_controller: Some("slipstream".into()),
        reporting_instance: Some("pod-1".into()),
        action: Some("Sync".into()),
        reason: Some("Synced".into()),
        type_: Some("Normal".into()),
        ..Default::default()
    };
    ev1.create(&PostParams::default(), &e1).await.unwrap();
    assert_eq!(
        ev1.get("e1").await.unwrap().reporting_controller.as_deref(),
        Some("slipstream")
    );

    let leases: Api<Lease> = Api::default_namespaced(client);
    let l = Lease {
        metadata: ObjectMeta {
            name: Some("leader".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            ..Default::default()
        }),
    };
    let l = leases.create(&PostParams::default(), &l).await.unwrap();
    let mut next = l.clone();
    next.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("leader", &PostParams::default(), &next)
        .await
        .unwrap();
    // A second replica racing with the old resourceVersion loses.
    let mut racer = l.clone();
    racer.spec.as_mut().unwrap().holder_identity = Some("c".into());
    assert_eq!(
        api_err(
            leases
                .replace("leader", &PostParams::default(), &racer)
                .await
        )
        .code,
        409
    );
    leases
        .patch(
            "leader",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"leaseDurationSeconds": 15}})),
        )
        .await
        .unwrap();
    leases
        .delete("leader", &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn dry_run_writes_are_validated_but_not_stored() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let c = cms.create(&dry, &cm("dry", &[("a", "1")])).await.unwrap();
    assert_eq!(c.metadata.name.as_deref(), Some("dry"));
    assert!(cms.get_opt("dry").await.unwrap().is_none());
    assert_eq!(
        api_err(cms.create(&dry, &cm("Bad_Name", &[])).await).code,
        422
    );
}

#[tokio::test]
async fn request_bodies_over_three_mebibytes_get_a_413_status() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let huge = "x".repeat(3 * 1024 * 1024 + 1);
    let s = api_err(
        cms.create(&PostParams::default(), &cm("huge", &[("a", &huge)]))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (413, "RequestEntityTooLarge"));
}

mod emulator_only {
    use super::*;

    #[tokio::test]
    async fn server_keeps_serving_while_the_test_runtime_is_blocked() {
        let (api, _client) = start_emulator().await;
        // A blocking call on the (current-thread) test runtime: only a server on its
        // own thread and runtime can answer it.
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(api.addr()).unwrap();
        s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("\"major\":\"1\""));
    }
}

//! Unit tests of the backup and restore decisions.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::build::{add_restore_init_container, build, validate as validate_cluster, RESTORE_CONTAINER};
use crate::config::OperatorConfig;
use crate::crd::{BackupSpec, RestoreSpec, RetentionSpec};
use crate::fixtures::raft_cluster;
use crate::plan::{MemberObs, MembershipObs, PodObs};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn backup_spec(schedule: &str) -> BackupSpec {
    BackupSpec {
        schedule: schedule.into(),
        destination: "s3://backups/prod".into(),
        access: StoreAccess {
            credentials_secret: Some("backup-creds".into()),
            endpoint: Some("http://minio:9000".into()),
            region: None,
            allow_http: Some(true),
        },
        retention: Some(RetentionSpec {
            keep_last: Some(3),
            keep_days: None,
        }),
    }
}

#[test]
fn schedules_take_five_or_six_fields_and_garbage_is_refused_with_the_field_named() {
    parse_schedule("0 */6 * * *").unwrap();
    parse_schedule("30 0 */6 * * *").unwrap();
    let err = parse_schedule("every hour").unwrap_err();
    assert!(err.contains("backup.schedule"), "{err}");
    let mut spec = raft_cluster(3, Some("img")).spec;
    spec.backup = Some(backup_spec("61 * * * *"));
    assert!(validate(&spec).unwrap_err().contains("not a cron schedule"));
    spec.backup = Some(BackupSpec {
        destination: "ftp://x/y".into(),
        ..backup_spec("0 * * * *")
    });
    assert!(validate(&spec).unwrap_err().contains("backup.destination"));
}

#[test]
fn a_scheduled_backup_is_due_once_its_time_passed_since_the_last_attempt() {
    let hourly = parse_schedule("0 * * * *").unwrap();
    let created = at("2026-12-02T06:10:00Z");
    assert_eq!(
        backup_due(&hourly, None, created, None, at("2026-12-02T06:59:59Z")),
        None
    );
    assert_eq!(
        backup_due(&hourly, None, created, None, at("2026-12-02T07:00:00Z")),
        Some(Trigger::Schedule)
    );
    let attempted = BackupStatus {
        last_attempt: Some(Time(at("2026-12-02T07:00:01Z"))),
        ..BackupStatus::default()
    };
    assert_eq!(
        backup_due(&hourly, Some(&attempted), created, None, at("2026-12-02T07:30:00Z")),
        None
    );
    // Missed slots while the operator was away: caught up once.
    assert_eq!(
        backup_due(&hourly, Some(&attempted), created, None, at("2026-12-02T11:30:00Z")),
        Some(Trigger::Schedule)
    );
}

#[test]
fn each_new_value_of_the_backup_now_annotation_asks_for_one_backup() {
    let yearly = parse_schedule("0 0 1 1 *").unwrap();
    let created = at("2026-12-02T06:10:00Z");
    let now = at("2026-12-02T06:20:00Z");
    assert_eq!(
        backup_due(&yearly, None, created, Some("1"), now),
        Some(Trigger::OnDemand("1".into()))
    );
    let done = BackupStatus {
        on_demand: Some("1".into()),
        last_attempt: Some(Time(now)),
        ..BackupStatus::default()
    };
    assert_eq!(backup_due(&yearly, Some(&done), created, Some("1"), now), None);
    assert_eq!(
        backup_due(&yearly, Some(&done), created, Some("2"), now),
        Some(Trigger::OnDemand("2".into()))
    );
    assert_eq!(backup_due(&yearly, Some(&done), created, Some(""), now), None);
}

fn observed(members: &[(u64, u32, bool, bool)], leader: u64) -> (Observed, BTreeMap<u32, String>) {
    // (id, ordinal, healthy, ready)
    let pods = members
        .iter()
        .map(|&(_, ordinal, _, ready)| {
            (
                ordinal,
                PodObs {
                    ordinal,
                    ready,
                    terminating: false,
                    up_to_date: true,
                    node: None,
                    failure: None,
                    unready_since: None,
                },
            )
        })
        .collect();
    let membership = MembershipObs {
        leader_id: leader,
        members: members
            .iter()
            .map(|&(id, ordinal, healthy, _)| MemberObs {
                id,
                ordinal: Some(ordinal),
                kind: MemberKind::Voter,
                match_index: Some(10),
                healthy: Some(healthy),
            })
            .collect(),
    };
    let endpoints = members
        .iter()
        .map(|&(_, o, _, _)| (o, format!("http://10.0.0.{o}:8080")))
        .collect();
    (
        Observed {
            statefulset_replicas: members.len() as u32,
            pods,
            claims: BTreeSet::new(),
            removed_member_claims: BTreeMap::new(),
            membership: Some(membership),
            bootstrap: None,
        },
        endpoints,
    )
}

#[test]
fn backups_stream_from_a_healthy_ready_follower_and_from_the_leader_only_without_one() {
    let (obs, urls) = observed(&[(1, 0, true, true), (2, 1, false, true), (3, 2, true, true)], 1);
    assert_eq!(pick_source(&obs, &urls).map(|(o, _)| o), Some(2));
    let (obs, urls) = observed(&[(1, 0, true, true), (2, 1, false, true), (3, 2, true, false)], 1);
    assert_eq!(
        pick_source(&obs, &urls).map(|(o, _)| o),
        Some(0),
        "only the leader is fit"
    );
    let (obs, urls) = observed(&[(1, 0, false, true), (2, 1, false, true)], 1);
    assert_eq!(pick_source(&obs, &urls), None);
}

fn source() -> RestoreSource {
    RestoreSource {
        url: "s3://backups/prod/demo-20261202T061500Z-r42.rkvsnap".into(),
        access: StoreAccess::default(),
    }
}

#[test]
fn a_new_cluster_seeds_from_its_backup_and_is_done_once_the_bootstrap_is_recorded() {
    let seeding_now = restore_status(Some(&source()), None, false, &BTreeSet::new(), None).unwrap();
    assert_eq!(seeding_now.state, RestoreState::Seeding);
    assert!(seeding(Some(&seeding_now)));
    let started = BootstrapRecord {
        member_id: 7,
        state: BootstrapState::Started,
        cluster_id: None,
    };
    let still = restore_status(
        Some(&source()),
        Some(&seeding_now),
        true,
        &BTreeSet::from([0]),
        Some(&started),
    );
    assert_eq!(
        still.unwrap().state,
        RestoreState::Seeding,
        "claims of its own seeding are no data"
    );
    let done = BootstrapRecord {
        state: BootstrapState::Done,
        ..started
    };
    let after = restore_status(
        Some(&source()),
        Some(&seeding_now),
        true,
        &BTreeSet::from([0]),
        Some(&done),
    )
    .unwrap();
    assert_eq!(after.state, RestoreState::Done);
    assert!(
        !seeding(Some(&after)),
        "a pod that loses its disk later joins, it does not restore"
    );
}

#[test]
fn a_restore_into_a_cluster_that_holds_data_is_refused_and_stays_refused() {
    let refused = restore_status(Some(&source()), None, false, &BTreeSet::from([0, 1]), None).unwrap();
    assert_eq!(refused.state, RestoreState::Refused);
    assert!(
        refused.message.as_deref().unwrap().contains("data claims"),
        "{refused:?}"
    );
    let bootstrapped = BootstrapRecord {
        member_id: 7,
        state: BootstrapState::Done,
        cluster_id: Some(9),
    };
    let refused2 = restore_status(Some(&source()), None, true, &BTreeSet::new(), Some(&bootstrapped)).unwrap();
    assert_eq!(refused2.state, RestoreState::Refused);
    assert_eq!(
        restore_status(Some(&source()), Some(&refused), false, &BTreeSet::new(), None),
        Some(refused.clone())
    );
    // Removing spec.restore clears a refusal; a completed restore is remembered.
    assert_eq!(restore_status(None, Some(&refused), true, &BTreeSet::new(), None), None);
    let done = RestoreStatus {
        state: RestoreState::Done,
        ..refused
    };
    assert_eq!(
        restore_status(None, Some(&done), true, &BTreeSet::new(), None),
        Some(done)
    );
}

#[test]
fn restore_from_resolves_backup_names_in_the_backup_destination_and_urls_as_given() {
    let mut spec = raft_cluster(3, Some("img")).spec;
    spec.restore = Some(RestoreSpec {
        from: "demo-20261202T061500Z-r42.rkvsnap".into(),
        access: StoreAccess::default(),
    });
    let err = resolve_restore(&spec).unwrap_err();
    assert!(err.contains("needs backup.destination"), "{err}");
    spec.backup = Some(backup_spec("0 * * * *"));
    let s = resolve_restore(&spec).unwrap();
    assert_eq!(s.url, "s3://backups/prod/demo-20261202T061500Z-r42.rkvsnap");
    assert_eq!(s.access.credentials_secret.as_deref(), Some("backup-creds"));
    spec.restore = Some(RestoreSpec {
        from: "file:///mnt/backups/old-20261202T061500Z-r1.rkvsnap".into(),
        access: StoreAccess {
            credentials_secret: Some("other".into()),
            ..StoreAccess::default()
        },
    });
    let s = resolve_restore(&spec).unwrap();
    assert_eq!(s.url, "file:///mnt/backups/old-20261202T061500Z-r1.rkvsnap");
    assert_eq!(s.access.credentials_secret.as_deref(), Some("other"));
    spec.restore = Some(RestoreSpec {
        from: "s3://bucket-only".into(),
        access: StoreAccess::default(),
    });
    assert!(resolve_restore(&spec).is_err());
}

#[test]
fn failures_count_until_a_success_and_two_in_a_row_are_backup_failing() {
    let mut s = BackupStatus::default();
    let t = at("2026-12-02T07:00:00Z");
    record(&mut s, t, &Trigger::Schedule, &Err("no healthy member".into()));
    assert_eq!(s.consecutive_failures, 1);
    assert_eq!(backup_failing(Some(&s)), None, "one failure is not yet a pattern");
    record(&mut s, t, &Trigger::OnDemand("x".into()), &Err("upload refused".into()));
    let (reason, message) = backup_failing(Some(&s)).unwrap();
    assert_eq!(reason, "BackupFailing");
    assert!(message.contains("upload refused"), "{message}");
    assert_eq!(s.on_demand.as_deref(), Some("x"));
    let ok = BackupSuccess {
        time: Time(t),
        revision: 42,
        size: 1000,
        object: "s3://b/p/x.rkvsnap".into(),
    };
    record(&mut s, t, &Trigger::Schedule, &Ok(ok.clone()));
    assert_eq!((s.consecutive_failures, s.last_success.clone()), (0, Some(ok)));
    assert!(s.last_failure.is_some(), "the last failure stays for the record");
    assert_eq!(backup_failing(Some(&s)), None);
}

#[test]
fn the_restore_init_container_seeds_the_data_directory_with_the_secret_as_environment() {
    let mut cluster = raft_cluster(3, Some("raftkv/node:dev"));
    cluster.spec.backup = Some(backup_spec("0 * * * *"));
    cluster.spec.restore = Some(RestoreSpec {
        from: "demo-20261202T061500Z-r42.rkvsnap".into(),
        access: StoreAccess::default(),
    });
    let config = OperatorConfig::default();
    let valid = validate_cluster(&cluster, &config).unwrap();
    let mut objects = build(&valid, &config, 1);
    add_restore_init_container(
        &mut objects.statefulset,
        &valid,
        &config,
        valid.restore.as_ref().unwrap(),
    );
    let pod = objects.statefulset.spec.template.spec.unwrap();
    let init = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.name, RESTORE_CONTAINER);
    assert_eq!(init.image.as_deref(), Some("raftkv/node:dev"));
    let args = init.args.clone().unwrap();
    assert_eq!(
        &args[..3],
        [
            "restore",
            "--from",
            "s3://backups/prod/demo-20261202T061500Z-r42.rkvsnap"
        ]
    );
    assert!(args
        .windows(2)
        .any(|w| w[0] == "--data-dir" && w[1] == crate::names::DATA_DIR));
    assert!(args
        .windows(2)
        .any(|w| w[0] == "--peer-url" && w[1].starts_with("http://")));
    let env: BTreeMap<_, _> = init
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.clone()))
        .collect();
    assert_eq!(env["AWS_ENDPOINT"].as_deref(), Some("http://minio:9000"));
    assert_eq!(env["AWS_ALLOW_HTTP"].as_deref(), Some("true"));
    let from_secret = init.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap();
    assert_eq!(from_secret.name, "backup-creds");
    let scratch = pod.volumes.as_ref().unwrap().iter().find(|v| v.empty_dir.is_some());
    assert!(scratch.is_some(), "the download needs a writable scratch volume");
}

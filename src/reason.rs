//! The reason words a user reads: in a status condition's `reason`, an
//! Event's `reason`, and the `reason` label of `slipstream_errors_total`.
//!
//! One enum, so a word is spelled once: the word is the variant's name
//! ([`Reason::as_str`]). README's "Failure behaviour" table lists the ones a
//! user can cause; each layer's error maps its variants to one of these
//! (`reason()` on `KvError`, `SinkError`, `ProjectionError`, `SpecError`,
//! `PolicyError`).

use std::fmt;

macro_rules! reasons {
    ($($(#[$doc:meta])* $word:ident,)*) => {
        /// A reason word; see the module documentation.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $word,)*
        }

        impl Reason {
            /// The word itself: the variant's name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$word => stringify!($word),)*
                }
            }

            /// The variant whose name is `word`.
            pub fn from_word(word: &str) -> Option<Self> {
                match word {
                    $(stringify!($word) => Some(Reason::$word),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    // The binding is fine.
    /// The ConfigMap holds the KV content at the cursor.
    Synced,
    /// A new binding waits for its first catch-up.
    Syncing,
    /// `Stalled` is False: nothing needs a human.
    Progressing,
    /// `spec.suspend`: watching, not writing.
    Suspended,
    /// A resync could not tell deleted keys from aged-out ones.
    ResyncedWithoutPrune,
    /// The workloads of `target.rollout` carry the content's digest.
    RolledOut,

    // The KV layer (`KvError`).
    NotConnected,
    ConnectionFailed,
    BucketNotFound,
    KeyNotFound,
    InvalidKey,
    AlreadyExists,
    RevisionMismatch,
    SerializationError,
    DeserializationError,
    WatchError,
    OperationFailed,
    Timeout,
    CursorExpired,
    /// Counted when a bucket was deleted and created again.
    BucketRecreated,

    // The projection (`ProjectionError`, `SpecError`).
    TooLarge,
    KeyCollision,
    InvalidBucketName,
    InvalidPrefixes,
    InvalidTargetName,
    /// `target.rollout` is malformed (interval, names, duplicates).
    InvalidRollout,
    /// The object does not deserialize (an older or hand-edited CRD).
    InvalidSpec,

    // The access policy (`PolicyError`).
    InvalidPolicy,
    AccessDenied,

    // The ConfigMap sink and the API (`SinkError`).
    WriteConflict,
    TargetConflict,
    /// A Merge binding's key that another field manager owns in the target.
    KeyOwnedByOther,
    StaleWriter,
    NotFound,
    Forbidden,
    Invalid,
    KubernetesError,
    StatusWriteFailed,
    /// A workload named in `target.rollout` does not exist.
    WorkloadNotFound,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_is_the_variant_name_and_reads_back() {
        for r in [
            Reason::Synced,
            Reason::TooLarge,
            Reason::StaleWriter,
            Reason::StatusWriteFailed,
        ] {
            assert_eq!(format!("{r:?}"), r.as_str());
            assert_eq!(Reason::from_word(r.as_str()), Some(r));
        }
        assert_eq!(Reason::from_word("NoSuchWord"), None);
        assert_eq!(Reason::AccessDenied, "AccessDenied");
    }
}

//! CancelRequest mapping: idgate hands each client its own BackendKeyData and keeps the map from
//! that key to the backend's real key and target. A CancelRequest with an unknown key is dropped
//! silently, as PostgreSQL does.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use subtle::ConstantTimeEq;

use crate::{config::TargetConfig, protocol::startup::CancelKey, types::SessionId};

/// Where a client's key leads.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// The target the session is connected to.
    pub target: TargetConfig,
    /// The backend's own key.
    pub backend_key: CancelKey,
    /// The session the key belongs to (for the audit trail).
    pub session_id: SessionId,
}

/// The key map, shared by all sessions. The lock is held only for map operations.
#[derive(Debug, Clone, Default)]
pub struct CancelMap {
    inner: Arc<Mutex<HashMap<i32, (i32, CancelTarget)>>>,
}

/// Removes its key from the map when the session ends.
#[derive(Debug)]
pub struct CancelRegistration {
    map: CancelMap,
    process_id: i32,
}

impl CancelMap {
    /// Issue a fresh random key for `target` and register it.
    pub fn register(&self, target: CancelTarget) -> (CancelKey, CancelRegistration) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let process_id: i32 = rand::random::<i32>() & i32::MAX;
            if process_id == 0 || map.contains_key(&process_id) {
                continue;
            }
            let secret_key: i32 = rand::random();
            map.insert(process_id, (secret_key, target));
            return (
                CancelKey {
                    process_id,
                    secret_key,
                },
                CancelRegistration {
                    map: self.clone(),
                    process_id,
                },
            );
        }
    }

    /// Look up a client-supplied key; the secret is compared in constant time.
    pub fn lookup(&self, key: CancelKey) -> Option<CancelTarget> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (secret, target) = map.get(&key.process_id)?;
        if bool::from(secret.to_be_bytes().ct_eq(&key.secret_key.to_be_bytes())) {
            Some(target.clone())
        } else {
            None
        }
    }
}

impl Drop for CancelRegistration {
    fn drop(&mut self) {
        let mut map = self.map.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&self.process_id);
    }
}

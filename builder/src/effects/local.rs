//! A local fleet's effects: `ami-agent` processes, the health command run here, the local
//! load balancer, no alarms, and the lock in the fleet's directory.

use super::Effects;
use crate::local::{LocalBalancer, LocalCompute, LocalRunCommand, NoAlarms, Store};
use crate::lock::file::FileStore;

pub struct LocalFleet {
    pub store: Store,
    pub compute: LocalCompute,
    pub run: LocalRunCommand,
    pub lb: LocalBalancer,
    pub alarms: NoAlarms,
}

impl LocalFleet {
    pub fn new(store: Store) -> LocalFleet {
        LocalFleet {
            compute: LocalCompute::new(store.clone()),
            run: LocalRunCommand {
                store: store.clone(),
            },
            lb: LocalBalancer::new(store.clone()),
            alarms: NoAlarms,
            store,
        }
    }

    /// The fleet called `name`, where local fleets live.
    pub fn open(name: &str) -> anyhow::Result<LocalFleet> {
        Ok(LocalFleet::new(Store::open(name)?))
    }

    /// The fleet's lock, `lease.json` in its directory.
    pub fn lock(&self) -> FileStore {
        FileStore::new(self.store.lease_path())
    }

    pub fn effects(&self) -> Effects<'_, LocalCompute, LocalRunCommand, LocalBalancer, NoAlarms> {
        Effects {
            compute: &self.compute,
            run: &self.run,
            lb: Some(&self.lb),
            alarms: &self.alarms,
            groups: crate::rollout::engine::NO_GROUPS,
        }
    }
}

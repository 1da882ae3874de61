"""Topic subscriptions of MessagingService (:mod:`mabeam.services.coordination.messaging`): the etcd keyspace in :mod:`.store`."""

"""fedlodrop on Flower (1.42, Message API): the same rounds as `fedlodrop run`, over Flower messages.

    records.py    DeviceTask / DeviceReply <-> RecordDict (ArrayRecord + ConfigRecord), bytes
    transport.py  push/pull with fast polling, replies matched to messages, node -> device discovery
    strategy.py   FedAvg subclass: configure_train / aggregate_train around fedlodrop's Server
    app.py        server_app and client_app
    launch.py     processes: app folder, SuperLink, SuperNodes, submit and wait, certificates, keys

Only launch.py is imported by the `fedlodrop flower` commands before a run starts (it needs no
Flower import); docs/flower.md explains the commands.
"""

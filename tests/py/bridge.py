"""A small bridge built with mautrix-python's application service library, driven by the
Plaza integration tests.

It reads one JSON command per line on stdin and writes one JSON line per thing it saw or did
on stdout: messages and typing pushed to it, user and alias queries it answered, and the
result of each command.

Usage: bridge.py HOMESERVER_URL PORT AS_TOKEN HS_TOKEN
"""

import asyncio
import json
import sys

from mautrix.appservice import AppService
from mautrix.types import EventType, RoomCreatePreset


def say(**fields):
    print(json.dumps(fields), flush=True)


async def main():
    homeserver, port, as_token, hs_token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    appservice = None

    async def query_user(user_id):
        # Create the ghost on demand, as bridges do for users of the other network.
        await appservice.intent.user(user_id).ensure_registered()
        say(query_user=user_id)
        return {}

    async def query_alias(alias):
        localpart = alias[1:].split(":", 1)[0]
        room_id = await appservice.intent.create_room(
            alias_localpart=localpart, preset=RoomCreatePreset.PUBLIC
        )
        say(query_alias=alias, room_id=room_id)
        return {}

    appservice = AppService(
        server=homeserver,
        domain="localhost",
        as_token=as_token,
        hs_token=hs_token,
        bot_localpart="mxbot",
        id="mx",
        query_user=query_user,
        query_alias=query_alias,
        ephemeral_events=True,
        state_store=None,
    )
    appservice.synchronous_handlers = True

    async def on_event(event):
        if event.type == EventType.ROOM_MESSAGE:
            say(message=event.content.body, sender=event.sender, room_id=event.room_id)
        elif event.type == EventType.TYPING:
            say(typing=[str(u) for u in event.content.user_ids], room_id=event.room_id)

    appservice.matrix_event_handler(on_event)
    await appservice.start(host="127.0.0.1", port=port)
    say(ready=True)

    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        try:
            if command["cmd"] == "puppet":
                intent = appservice.intent.user(command["user_id"])
                await intent.ensure_registered()
                await intent.join_room(command["room_id"])
                say(done="puppet", user_id=command["user_id"])
            elif command["cmd"] == "send":
                intent = appservice.intent.user(command["user_id"])
                event_id = await intent.send_text(command["room_id"], command["text"])
                say(done="send", event_id=str(event_id))
            elif command["cmd"] == "ping":
                duration = await appservice.ping_self("mautrix-ping")
                say(done="ping", duration_ms=duration)
        except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
            say(error=f"{command['cmd']}: {error!r}")
    await appservice.stop()


if __name__ == "__main__":
    asyncio.run(main())

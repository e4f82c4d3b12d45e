import asyncio
import websockets

async def client():
    async with websockets.connect("ws://localhost:8765") as websocket:
        await websocket.send("Hello, WebSocket!")
        data = await websocket.recv()
        print(f"Received data: {data}")

asyncio.get_event_loop().run_until_complete(client())
